"""Tracking: sequence order, the motion model, settings, and tracking a synthetic sequence on the
tiny trained field (tiny_run: the same room as the sequence, seed 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastnefes.data.synth import synthetic_write_options
from fastnefes.errors import FastnefesError
from fastnefes.geometry import perturb_poses, pose_errors, read_poses, se3_exp, write_poses
from fastnefes.refine.sequence import natural_key, tracking_segments
from fastnefes.refine.track import TRACK_FRAME, refine_config

from conftest import field_views, run_main

N_FRAMES = 10
# Settings for the 64 x 48 images (TRACK_FRAME's strides are for 160 x 120): keyframe pixels on
# the full-resolution grid (the 768 most textured; at stride 2 the 32 x 24 grid is too coarse for
# the direct polish: one frame ended 0.6 deg off), judged at stride 4; a light start.
TINY_FRAME = {"polish_stride": 1, "polish_rays": 768, "stride": 4}
TINY_START = {"iters": 40, "coarse_iters": 10, "search_pad": 0.0, "polish_levels": 2}


def test_segments_follow_frame_numbers_and_restart_at_init_poses():
    names = [f"seq-{s:02d}/frame-{f:06d}.color.png" for s in (10, 2) for f in (3, 0, 2, 1)]
    segments = tracking_segments(names, {"seq-02/frame-000000.color.png", "seq-10/frame-000000.color.png"}, "split", "init.txt")
    assert [s.names[0] for s in segments] == ["seq-02/frame-000000.color.png", "seq-10/frame-000000.color.png"]
    assert segments[0].frames == [0, 1, 2, 3] and segments[0].sequence == "seq-02/frame-*.color.png"
    # Another init pose restarts tracking there; it may also bridge a gap.
    names = ["r_0.png", "r_1.png", "r_5.png", "r_6.png"]
    segments = tracking_segments(names, {"r_0.png", "r_5.png"}, "split", "init.txt")
    assert [s.names for s in segments] == [["r_0.png", "r_1.png"], ["r_5.png", "r_6.png"]]
    # A constant step other than 1 (every tenth frame) is no gap.
    assert len(tracking_segments(["a10.png", "a20.png", "a0.png"], {"a0.png"}, "split", "init.txt")) == 1
    assert natural_key("seq-2") < natural_key("seq-10")


@pytest.mark.parametrize("names, starts, message", [
    (["r_0.png", "r_1.png", "r_3.png", "r_4.png"], {"r_0.png"}, "jumps from frame 1 to 3 (step 1): a gap; give a pose for 'r_3.png' in init.txt"),
    (["r_1.png", "r_2.png"], {"r_2.png"}, "init.txt: no pose for 'r_1.png', the first frame of sequence 'r_*.png'"),
    (["a/f1.png", "a/f01.png"], {"a/f1.png"}, "have the same frame number 1"),
    (["left.png", "r_0.png"], {"r_0.png"}, "image 'left.png' has no frame number"),
])
def test_segments_refuse_gaps_missing_starts_and_ambiguous_order(names, starts, message):
    with pytest.raises(FastnefesError) as info:
        tracking_segments(names, starts, "the test split", "init.txt")
    assert message in str(info.value) and "\n" not in str(info.value)


def _scripted_tracker(statuses: list[str], truth: np.ndarray, window: int):
    """A Tracker whose refiner returns the true pose of each frame with the scripted status (the
    initial pose where the status is flagged), recording the initial poses it was given."""
    import torch

    from fastnefes.refine.result import QueryDiagnostics, RefineResult
    from fastnefes.refine.track import Tracker

    tracker = Tracker(torch.nn.Linear(1, 1), exposure_stride=0, velocity_window=window, max_coast=2)
    starts = []

    def refine(images, K, init_c2w):
        k = len(starts)
        starts.append(init_c2w[0])
        ok = statuses[k] in ("converged", "max_iters")
        pose = truth[k] if ok else init_c2w[0]
        return RefineResult(pose[None], init_c2w, [QueryDiagnostics(1.0, 0.5, 3, 0.01, statuses[k])])

    tracker.frame_refiner.refine = tracker.start_refiner.refine = refine
    return tracker, starts


@pytest.mark.parametrize("window", [1, 3])
def test_constant_velocity_coasts_over_kept_predictions_and_stops_after_failures(window):
    step = se3_exp(np.array([0.004, -0.002, 0.006, 0.003, 0.001, -0.002]))  # camera-frame motion per frame
    statuses = ["converged", "max_iters", "converged", "converged", "kept_initial", "converged", "converged",
                "kept_initial", "kept_initial", "kept_initial", "converged", "converged", "failed", "converged",
                "converged", "converged"]
    truth = [se3_exp(np.array([0.1, 0.2, -0.3, 1.0, 2.0, 0.5]))]
    for _ in statuses[1:]:
        truth.append(truth[-1] @ step)
    truth = np.stack(truth)
    tracker, starts = _scripted_tracker(statuses, truth, window)
    tracker.start(truth[0])
    image, K = np.zeros((4, 4, 3), np.uint8), np.eye(3)
    motions = [tracker.track(image, K).motion for _ in truth]
    # The velocity needs two accepted frames within the window; it is carried over at most two
    # kept predictions in a row (frames 4, 7 and 8), not over a third (9) nor a failure (12).
    assert motions[:6] == ["init", "zero_velocity"] + ["constant_velocity"] * 4
    assert motions[6] == ("zero_velocity" if window == 1 else "constant_velocity")  # frame 4's gap
    assert motions[7:] == ["constant_velocity"] * 3 + ["zero_velocity"] * 2 + ["constant_velocity"] + ["zero_velocity"] * 2 \
        + ["constant_velocity"]
    # Constant velocity predicts the true pose exactly, across the kept frames too; zero velocity
    # starts from the last pose (a kept or failed frame's is its prediction).
    for k, motion in enumerate(motions[1:], 1):
        expected = truth[k] if motion == "constant_velocity" else starts[k - 1] if statuses[k - 1] not in ("converged", "max_iters") else truth[k - 1]
        assert np.allclose(starts[k], expected, atol=1e-9), k


def test_refine_config_checks_fields_types_and_values():
    cfg = refine_config(TRACK_FRAME)
    assert cfg.iters == 0 and cfg.polish_levels == 1 and cfg.search_pad == 0
    assert refine_config({"lr_rot": 1}).lr_rot == 1  # an integer where a float is expected is fine
    for bad, message in [({"polish_iter": 3}, "unknown setting 'polish_iter'"), ({"polish_iters": 2.5}, "should be int"),
                         ({"target": "apr"}, "not one of pose"), ({"polish_stride": 0}, ">= 1"),
                         ({"lr_rot": float("nan")}, "finite number"), ({"verify": 1}, "should be bool")]:
        with pytest.raises(FastnefesError) as info:
            refine_config(bad, "--config")
        assert message in str(info.value) and str(info.value).startswith("--config: ")


@pytest.fixture(scope="module")
def tiny_sequence(tmp_path_factory):
    """(scene, data folder): N_FRAMES consecutive 30 fps test frames of tiny_scene's room, in the
    7-Scenes layout (train views as tiny_scene's but for their exposures)."""
    from fastnefes.data import load_scene, write_scene
    from fastnefes.data.synth import make_synthetic_scene

    scene = make_synthetic_scene(seed=3, width=64, height=48, n_train=24, n_test=N_FRAMES, test_fps=30)
    data = tmp_path_factory.mktemp("tiny_sequence") / "data"
    write_scene(scene, data, "7scenes", **synthetic_write_options("7scenes", 24, test_sequence=N_FRAMES))
    return load_scene(data), data


def test_synthetic_sequence_moves_a_few_mm_per_frame(tiny_sequence):
    scene, _ = tiny_sequence
    test = scene.split("test")
    assert len({n.split("/")[0] for n in (scene.names[i] for i in test)}) == 1  # one 7-Scenes sequence
    t, r = pose_errors(scene.c2w[test[1:]], scene.c2w[test[:-1]])
    assert 0.001 < t.min() and t.max() < 0.006 and r.max() < 1.5
    with pytest.raises(FastnefesError, match="a test sequence of 13 frames does not fit one 7scenes sequence"):
        synthetic_write_options("7scenes", 24, test_sequence=13)


def test_tracking_stays_within_bounds(tiny_run, tiny_sequence):
    """From a start 1 cm / 1 deg off the truth, every frame of the sequence ends within 2 cm /
    0.5 deg of it (without refinement the path turns 5 deg in these frames), and the motion model
    takes over after the first frames."""
    from fastnefes.refine.track import Tracker

    _, model = tiny_run
    scene, _ = tiny_sequence
    test = scene.split("test")
    views = field_views(model, scene.K[test], scene.c2w[test], scene.hw[test[0]])
    tracker = Tracker(model, refine_config({**TRACK_FRAME, **TINY_FRAME}), refine_config(TINY_START), exposure_stride=4)
    tracker.start(perturb_poses(scene.c2w[test[:1]], 1.0, 0.01, seed=1)[0])
    frames = [tracker.track(view, scene.K[i]) for view, i in zip(views, test)]
    t, r = pose_errors(np.stack([f.pose for f in frames]), scene.c2w[test])
    assert t.max() < 0.02 and r.max() < 0.5, (t, r, [f.diagnostics.status for f in frames])
    assert sum(f.motion == "constant_velocity" for f in frames) >= N_FRAMES // 3
    _, turned = pose_errors(scene.c2w[test[-1]], scene.c2w[test[0]])
    assert turned > 4.0


def test_track_cli_writes_trajectory_and_refuses_bad_input(tiny_run, tiny_sequence, tmp_path, monkeypatch, capsys):
    run_dir, _ = tiny_run
    scene, data = tiny_sequence
    test = [scene.names[i] for i in scene.split("test")]
    gt = {n: scene.c2w[i] for n, i in zip(test, scene.split("test"))}
    write_poses(tmp_path / "first.txt", {test[0]: gt[test[0]]})
    out = tmp_path / "track.txt"
    args = ["track", str(run_dir), "--data", str(data), "--out", str(out)]
    code, stdout, err = run_main(monkeypatch, capsys, *args, "--init", str(tmp_path / "first.txt"),
                                 "--config", json.dumps({**TINY_FRAME, "polish_iters": 3}), "--start-config", json.dumps(TINY_START))
    assert code == 0, err
    assert list(read_poses(out)) == test
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["frame_config"]["polish_iters"] == 3 and report["frame_config"]["search_pad"] == 0
    assert report["start_config"]["iters"] == 40 and report["frame_config"]["polish_judge"] == "keyframes"
    assert len(report["frames"]) == len(test) and {"p50", "p95"} <= set(report["latency_ms"])
    assert {"status", "latency_ms", "trans_err", "rot_err_deg", "motion"} <= set(report["frames"][1])
    assert report["evaluation"]["after"]["max_trans"] == max(f["trans_err"] for f in report["frames"])
    # Bad input: one line, exit code 2, nothing written. A copy of the data with a frame removed is gappy.
    gappy = tmp_path / "gappy"
    shutil.copytree(data, gappy)
    for f in (gappy / test[4]).parent.glob(Path(test[4]).name.split(".")[0] + ".*"):
        f.unlink()
    write_poses(tmp_path / "second.txt", {test[1]: gt[test[1]]})
    for folder, init, config, expected in [
        (data, "second.txt", None, f"second.txt: no pose for {test[0]!r}, the first frame of sequence"),
        (gappy, "first.txt", None, f"jumps from frame 3 to 5 (step 1): a gap; give a pose for {test[5]!r}"),
        (data, "first.txt", '{"polish_iter": 3}', "--config: unknown setting 'polish_iter'"),
        (data, "first.txt", "{oops", "--config: not valid JSON"),
    ]:
        extra = ["--config", config] if config else []
        code, _, err = run_main(monkeypatch, capsys, "track", str(run_dir), "--data", str(folder), "--out", str(tmp_path / "bad.txt"),
                                "--init", str(tmp_path / init), *extra)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad.txt").exists()
