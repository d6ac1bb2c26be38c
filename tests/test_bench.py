"""`fastnefes bench train` / `bench refine` on a tiny scene with tiny budgets: structure and sanity
of the printed tables and the --json output (not speed), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnefes.timing import SectionTimer, section
from conftest import run_main

REPO = Path(__file__).resolve().parents[1]

TINY = ('{"batch_rays": 256, "batch_samples": 4000, "model": {"mlp_width": 16, "mlp_depth": 2, "mlp_skip": 1, '
        '"coarse_samples": 8, "fine_samples": 8, "encoder_stride": 4, "encoder_width": 8, "feature_dim": 8, '
        '"grid": {"n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 8, '
        '"per_level_scale": 1.5}, "occ_resolution": 16}}')


def test_section_timer_accumulates_only_while_active():
    with section("x"):
        pass  # no timer: nothing recorded anywhere
    with SectionTimer(torch.device("cpu")) as timer:
        for _ in range(3):
            with section("a"):
                sum(range(10000))
        with section("b"):
            pass
    assert set(timer.totals) == {"a", "b"} and timer.totals["a"] > 0
    with section("a"):
        pass
    assert set(timer.totals) == {"a", "b"}


def test_allocator_setting_is_opt_out():
    code = "from fastnefes.ops._allocator import keep_freed_memory_in_heap as k; print(k(), k())"
    env = dict(os.environ, FASTNEFES_ALLOCATOR="system")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
    if sys.platform.startswith("linux"):
        env.pop("FASTNEFES_ALLOCATOR")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.stdout.split() == ["True", "True"], out.stderr


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "room"
    done = subprocess.run([sys.executable, "-m", "fastnefes", "synth", str(root), "--format", "7scenes", "--seed", "3",
                           "--width", "48", "--height", "36", "--train", "16", "--test", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root


def test_bench_train_then_refine_json(tiny_dataset, tmp_path, monkeypatch, capsys):
    runs, train_json, refine_json = tmp_path / "runs", tmp_path / "train.json", tmp_path / "refine.json"
    code, out, err = run_main(monkeypatch, capsys, "bench", "train", str(tiny_dataset), "--minutes-hash", "0.04",
                              "--minutes-mlp", "0.04", "--psnr", "5,60", "--val-views", "1", "--config", TINY,
                              "--save-runs", str(runs), "--json", str(train_json), "--device", "cpu")
    assert code == 0, err
    assert "bench train" in out and "mlp/h" in out
    result = json.loads(train_json.read_text())
    assert result["benchmark"] == "train" and result["environment"]["device_type"] == "cpu"
    assert set(result["environment"]["backends"]) >= {"composite", "hashgrid", "occgrid"}
    for arch in ("hash", "mlp"):
        row = result["archs"][arch]
        assert row["steps"] >= 1 and row["steps_per_s"] > 0 and row["samples_per_s"] >= row["rays_per_s"] > 0
        assert 0 < row["train_time_s"] < 60 and row["curve"] and row["best_psnr"] > 5
        assert row["time_to_psnr_s"]["5"] is not None and row["time_to_psnr_s"]["60"] is None
        assert (runs / arch / "model.safetensors").exists()
    assert result["ratios"]["60"] == {"ratio": None, "lower_bound": None}
    assert result["ratios"]["5"]["ratio"] > 0

    code, out, err = run_main(monkeypatch, capsys, "bench", "refine", str(runs / "mlp"), "--data", str(tiny_dataset),
                              "--baseline", str(runs / "hash"), "--queries", "2", "--batch-sizes", "1,2",
                              "--throughput-iters", "2", "--breakdown-iters", "2", "--trans", "0.05:0.1",
                              "--config", '{"iters": 3, "coarse_iters": 1, "polish_iters": 1, "polish_levels": 1}',
                              "--json", str(refine_json), "--device", "cpu")
    assert code == 0, err
    assert "per-iteration breakdown" in out and "field_forward" in out
    result = json.loads(refine_json.read_text())
    assert list(result["archs"]) == ["hash", "mlp"]  # hash first whichever run was the argument
    assert list(result["rows"]) == ["hash default", "hash nefes", "mlp nefes"]
    for label, row in result["rows"].items():
        assert row["arch"] == label.split()[0] and row["preset"] == label.split()[1]
        lat = row["latency_ms"]
        assert lat["n"] == 2 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        b = row["breakdown"]
        assert 1 <= b["iterations"] <= 2 and b["feature_map"] == [36 // 4, 48 // 4]
        assert sum(b["sections_ms"].values()) == pytest.approx(b["iteration_ms"], rel=0.02)
        assert b["sections_ms"]["field_forward"] > 0
        # Adam differentiates the loss backwards; direct alignment renders without gradients
        assert (b["sections_ms"]["backward"] > 0) == (b["method"] == "adam")
        assert [t["batch"] for t in row["throughput"]] == [1, 2] and all(t["queries_per_s"] > 0 for t in row["throughput"])
        assert 0.05 <= row["error_before"]["median_trans"] <= 0.1
        assert all(v >= 0 for v in row["error_after"].values()) and 0 <= row["within"]["fraction"] <= 1
    for key in ("ratios", "end_to_end", "presets"):
        assert key in result
    assert result["ratios"]["iteration_time"] > 0 and result["end_to_end"]["latency_p50"] > 0
    assert list(result["presets"]) == ["hash nefes"]

    # The suite's markdown table renders from these two files (what the README quotes).
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from run_suite import markdown
    finally:
        sys.path.pop(0)
    md = markdown(json.loads(train_json.read_text()), result)
    assert "| mlp / hash, same preset |" in md and "| hash nefes / hash default |" in md and "| field_forward |" in md and "queries/s @2" in md


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bench_bad_input_is_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "bench", "train", str(tiny_dataset), "--config", "{not json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--config" in err
    code, _, err = run_main(monkeypatch, capsys, "bench", "train", str(tiny_dataset), "--config", '{"stepz": 1}')
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stepz" in err
    code, _, err = run_main(monkeypatch, capsys, "bench", "train", str(tiny_dataset), "--psnr", "25,abc")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--psnr" in err
    code, _, err = run_main(monkeypatch, capsys, "bench", "train", str(tiny_dataset), "--archs", "hash,nerf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'hash,nerf'" in err
    code, _, err = run_main(monkeypatch, capsys, "bench", "refine", str(tmp_path / "norun"), "--data", str(tiny_dataset),
                            "--config", '{"iterz": 3}')
    assert code == 2 and len(err.strip().splitlines()) == 1 and "iterz" in err
