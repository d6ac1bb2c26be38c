"""Refinement sharded with torchrun (gloo on CPU) gives the single-process run's pose file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fastnefes.geometry import perturb_poses, write_poses
from fastnefes.refine.distributed import shard_names

from conftest import run_main

LIGHT = ["--iters", "8", "--search-pad", "0", "--polish-iters", "0"]


def test_shards_are_whole_batches_that_cut_again_the_same_way():
    names = [f"n{i}" for i in range(10)]
    shards = [shard_names(names, 3, rank, 2) for rank in range(2)]
    assert shards == [["n0", "n1", "n2", "n6", "n7", "n8"], ["n3", "n4", "n5", "n9"]]
    for shard in shards:  # refine_split cuts a shard into runs of 3 again: each is one of the original runs
        runs = [shard[lo : lo + 3] for lo in range(0, len(shard), 3)]
        assert all(run == names[names.index(run[0]) : names.index(run[0]) + len(run)] for run in runs)
    assert sorted(sum((shard_names(names, 4, r, 3) for r in range(3)), [])) == sorted(names)
    assert shard_names(names[:1], 8, 1, 2) == []  # a rank can have nothing to do


def test_distributed_flag_without_torchrun_is_one_line(monkeypatch, capsys, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_main(monkeypatch, capsys, "refine", str(tmp_path / "run"), "--data", str(tmp_path), "--init",
                            str(tmp_path / "i.txt"), "--out", str(tmp_path / "o.txt"), "--distributed")
    assert code == 2 and "not launched by torchrun" in err and len(err.strip().splitlines()) == 1


def test_two_rank_torchrun_matches_single_process(tiny_run, tiny_scene, tmp_path):
    from fastnefes.data import load_scene, write_scene

    run_dir, _ = tiny_run
    data = tmp_path / "data"
    write_scene(tiny_scene, data, "7scenes")
    scene = load_scene(data)
    test = scene.split("test")
    write_poses(tmp_path / "init.txt", dict(zip([scene.names[i] for i in test], perturb_poses(scene.c2w[test], 2.0, 0.03, seed=5))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun gives each of several ranks
    args = ["refine", str(run_dir), "--data", str(data), "--init", str(tmp_path / "init.txt"), "--device", "cpu",
            "--batch", "1", *LIGHT]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastnefes"]
    sharded = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "sharded.txt")], capture_output=True, text=True,
                             env=env, timeout=1200)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "fastnefes", *args, "--out", str(tmp_path / "single.txt")],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert single.returncode == 0, single.stderr[-3000:]
    assert (tmp_path / "sharded.txt").read_text() == (tmp_path / "single.txt").read_text()
    report = json.loads((tmp_path / "sharded.json").read_text())
    reference = json.loads((tmp_path / "single.json").read_text())
    assert report["ranks"] == 2 and reference["ranks"] == 1
    strip = ("wall_time_s",)  # the rest (losses, iterations, status, confidence) must match exactly
    assert [{k: v for k, v in q.items() if k not in strip} for q in report["queries"]] == \
           [{k: v for k, v in q.items() if k not in strip} for q in reference["queries"]]
    assert sharded.stdout.count("wrote ") == 1  # only rank 0 reports
    assert not list(tmp_path.glob(".sharded*"))  # no temporary file left behind
