"""The demo end to end on a shrunken plan: every stage runs and leaves its files behind."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from fastnefes import demo
from fastnefes.errors import FastnefesError
from fastnefes.geometry import read_poses


@pytest.fixture
def small_plan(monkeypatch):
    plan = demo.DemoPlan(width=48, height=36, n_train=12, n_test=3, field_steps=60, apr_epochs=None, refine_batch=3,
                         batch_samples=4096)
    monkeypatch.setitem(demo.PLANS, "quick", plan)
    return plan


def test_quick_demo_writes_the_pipeline_and_the_table(small_plan, tmp_path, monkeypatch):
    import fastnefes.refine
    from fastnefes.refine import RefineConfig

    # Few refinement iterations: this checks the plumbing, the benchmark checks accuracy.
    monkeypatch.setattr(fastnefes.refine, "RefineConfig", functools.partial(RefineConfig, iters=4, polish_iters=1))
    said = []
    summary = demo.run_demo(tmp_path / "demo", quick=True, seed=1, say=said.append)
    out = tmp_path / "demo"
    assert [s[:5] for s in said] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    init, refined = read_poses(out / "init.txt"), read_poses(out / "refined.txt")
    assert list(init) == list(refined) and len(init) == small_plan.n_test
    saved = json.loads((out / "demo.json").read_text())
    assert saved["before"]["count"] == saved["after"]["count"] == small_plan.n_test
    assert saved["before"]["median_rot_deg"] == pytest.approx(summary["before"]["median_rot_deg"])
    assert 5.0 <= saved["before"]["median_rot_deg"] <= 10.0  # the perturbation the demo promises
    for picture in summary["pictures"]:
        assert open(picture, "rb").read(4) == b"\x89PNG"
    assert (out / "run" / "model.safetensors").exists() and (out / "refined.json").exists()
    assert json.loads((out / "run" / "config.json").read_text())["train"]["batch_samples"] == 4096  # the plan's
    with pytest.raises(FastnefesError, match="not empty"):
        demo.run_demo(out, quick=True, seed=1, say=said.append)


def test_demo_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "fastnefes", "demo", "--quick", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
