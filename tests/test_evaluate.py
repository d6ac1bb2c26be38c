"""Pose evaluation numbers on hand-made cases, and the eval / perturb CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fastnefes.errors import FastnefesError
from fastnefes.evaluate import evaluate_poses, parse_thresholds
from fastnefes.geometry import read_poses, so3_exp, write_poses


def pose(t=(0, 0, 0), rot_deg=0.0, axis=(0, 0, 1)):
    T = np.eye(4)
    T[:3, :3] = so3_exp(np.asarray(axis, float) * math.radians(rot_deg))
    T[:3, 3] = t
    return T


def test_hand_made_errors_and_recalls():
    gt = {f"{i}.png": pose() for i in range(4)}
    pred = {
        "0.png": pose((0.01, 0, 0), 1.0),  # within 2cm/2deg
        "1.png": pose((0, 0.04, 0), 4.0),  # within 5cm/5deg
        "2.png": pose((0, 0, 0.5), 30.0),  # fails all
        # 3.png missing: counts as a failure
        "extra.png": pose(),
    }
    ev = evaluate_poses(gt, pred)
    s = ev.summary()
    assert s["count"] == 4 and s["evaluated"] == 3 and s["missing"] == 1
    assert ev.missing == ["3.png"] and ev.extra == ["extra.png"]
    # errors sorted: 0.01, 0.04, 0.5, inf -> median (0.04 + 0.5) / 2
    assert s["median_trans"] == pytest.approx(0.27)
    assert s["median_rot_deg"] == pytest.approx(17.0)
    assert s["mean_trans"] == pytest.approx((0.01 + 0.04 + 0.5) / 3)
    assert s["recall"] == {"0.02/2deg": 0.25, "0.05/5deg": 0.5, "0.1/10deg": 0.5}


def test_parse_thresholds():
    assert parse_thresholds("0.25:2,0.5:5") == ((0.25, 2.0), (0.5, 5.0))
    with pytest.raises(FastnefesError, match="TRANS:DEG"):
        parse_thresholds("0.25")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastnefes", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_perturb_then_eval_cli(tmp_path):
    rng = np.random.default_rng(0)
    gt = {f"img{i}.png": pose(rng.normal(size=3), rng.uniform(0, 90), rng.normal(size=3) / 2) for i in range(10)}
    for k in gt:
        gt[k][:3, :3] = so3_exp(rng.normal(size=3))
    write_poses(tmp_path / "gt.txt", gt)
    r = run_cli("perturb", tmp_path / "gt.txt", "--rot-deg", "3", "--trans", "0.04", "--seed", "1", "--out", tmp_path / "init.txt")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--gt", tmp_path / "gt.txt", "--pred", tmp_path / "init.txt", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["median_trans"] == pytest.approx(0.04, abs=1e-6)
    assert summary["median_rot_deg"] == pytest.approx(3.0, abs=1e-4)
    assert summary["recall"]["0.05/5deg"] == 1.0 and summary["recall"]["0.02/2deg"] == 0.0
    assert len(read_poses(tmp_path / "init.txt")) == 10


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.txt").write_text("a.png 1 0 0 0 0 0\n")
    r = run_cli("eval", "--gt", tmp_path / "bad.txt", "--pred", tmp_path / "bad.txt")
    assert r.returncode == 2
    assert "bad.txt:1: expected 8 fields" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("perturb", tmp_path / "bad.txt", "--rot-deg", "5:1", "--out", tmp_path / "o.txt")
    assert r.returncode == 2 and "--rot-deg '5:1'" in r.stderr and not (tmp_path / "o.txt").exists()
