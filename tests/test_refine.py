"""Refinement: constructed cases for the optimiser's book-keeping, and real refinement on a tiny
trained field."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastnefes.geometry import perturb_poses, pose_errors, read_poses, write_poses
from fastnefes.refine import RefineConfig, Refiner
from fastnefes.refine.losses import feature_metric_loss
from fastnefes.refine.optim import BatchedAdam

from conftest import field_views, query_views


def test_batched_adam_rows_are_independent_and_frozen_rows_do_not_move():
    lrs = torch.tensor([0.1, 0.2])
    p = torch.zeros(3, 2)
    adam = BatchedAdam(3, lrs)
    g = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.3, 0.3]])
    adam.step(p, g, torch.tensor([0, 1, 2]), 1.0)
    # First Adam step moves every coordinate by lr against the gradient's sign.
    assert torch.allclose(p, -torch.sign(g) * lrs)
    before = p[1].clone()
    adam.step(p, g[[0, 2]], torch.tensor([0, 2]), 1.0)
    assert torch.equal(p[1], before)  # row 1 frozen: no momentum drift
    single = torch.zeros(1, 2)
    a1 = BatchedAdam(1, lrs)
    a1.step(single, g[:1], torch.tensor([0]), 1.0)
    a1.step(single, g[:1], torch.tensor([0]), 1.0)
    assert torch.allclose(single[0], p[0])  # same trajectory alone as in the batch


def test_feature_losses():
    a = torch.randn(2, 8, 4, 5)
    assert torch.allclose(feature_metric_loss(a, a), torch.zeros(2), atol=1e-6)
    assert torch.allclose(feature_metric_loss(a, -a), torch.full((2,), 2.0), atol=1e-6)
    assert torch.allclose(feature_metric_loss(a, a, "robust"), torch.zeros(2), atol=1e-6)
    assert (feature_metric_loss(a, torch.randn_like(a), "robust") > 0).all()
    with pytest.raises(ValueError):
        feature_metric_loss(a, a, "l3")


@pytest.mark.parametrize("seed", [1, 2])
def test_refinement_reduces_every_error(tiny_run, tiny_scene, seed):
    """The whole pipeline (search, feature phase, RGB polish, verification) from 5 cm / 3 deg,
    on queries the tiny field renders itself: its minima are then at the truth, so every query
    must end closer, and by a wide margin (the tiny field's own accuracy limit is the next test)."""
    _, model = tiny_run
    _, K, gt = query_views(tiny_scene)
    images = field_views(model, K, gt, tiny_scene.hw[0])
    init = perturb_poses(gt, 3.0, 0.05, seed=seed)
    res = Refiner(model, RefineConfig()).refine(images, K, init)
    t0, r0 = pose_errors(init, gt)
    t1, r1 = pose_errors(res.poses, gt)
    status = [d.status for d in res.diagnostics]
    assert np.all(t1 < 0.2 * t0) and np.all(r1 < 0.2 * r0), (t1, r1, status)
    assert all(s in ("converged", "max_iters") for s in status), status


@pytest.mark.xfail(strict=True, reason=(
    "known gap: on the real test images a field this small (64x48, 24 views, a minute of CPU) "
    "renders the test views at 20-27 dB, and at its refined poses (12-29 cm from the truth for 2 "
    "of 4 queries) both the feature and the RGB loss are at or below their values at the truth: "
    "minima of the field, not misses of the optimiser (more views, 128x96 images, a finer grid or "
    "800-1500 steps moved but did not remove them). On a full-size room field it converges "
    "(benchmarks/refine_accuracy.py); the pixel check returns such queries flagged (next test). "
    "Strict: once it passes here the marker must go"))
def test_refinement_reduces_every_error_on_real_images(tiny_run, tiny_scene):
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene)
    init = perturb_poses(gt, 3.0, 0.05, seed=1)
    res = Refiner(model, RefineConfig()).refine(images, K, init)
    t0, r0 = pose_errors(init, gt)
    t1, r1 = pose_errors(res.poses, gt)
    assert np.all(t1 < t0) and np.all(r1 < r0), (t1, r1, [d.status for d in res.diagnostics])


def test_no_pose_is_returned_worse_unflagged_on_real_images(tiny_run, tiny_scene):
    """Where the tiny field's minima are away from the truth (the known gap above), the query's
    pixels catch the refinement: no pose returned as refined is far from where it started
    towards a wrong minimum, every other one is its start, flagged."""
    from fastnefes.refine.verify import calibrate_pixel_check

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene)
    init = perturb_poses(gt, 3.0, 0.05, seed=1)
    try:
        assert 0.3 < calibrate_pixel_check(model, tiny_scene) <= 1.0  # as refine_split does
        res = Refiner(model, RefineConfig()).refine(images, K, init)
    finally:
        del model.pixel_reference  # the shared fixture's model stays uncalibrated
    t0, r0 = pose_errors(init, gt)
    t1, r1 = pose_errors(res.poses, gt)
    for i, d in enumerate(res.diagnostics):
        if d.status in ("converged", "max_iters"):
            # what the pixels prove: the rendering at the returned pose matches the query better
            assert d.ssim_refined > d.ssim_initial, d
            # and no gross regression (unchecked, queries end 30 cm / 10 deg away). A few cm stay
            # possible: on a 64x48 query 7 cm along the view axis moves the image by under a
            # pixel, and the tiny field renders such poses as well as the truth (SSIM 0.77 / 0.78)
            assert t1[i] < t0[i] + 0.1 and r1[i] < r0[i] + 0.5, (i, t1, r1, d)
        else:
            np.testing.assert_allclose(res.poses[i], init[i], atol=1e-6)


def test_verification_judges_the_polish_by_its_own_loss(tiny_run, tiny_scene, monkeypatch):
    """The feature phase is verified against the initial pose by the feature loss; a polish that
    then moves the pose is kept even where the feature loss at the polished pose is worse than
    at the initial pose (it is guarded by its RGB loss instead). The pixel check, on by
    default, then turns down a polish that moved the pose far away."""
    import fastnefes.refine.refiner as refiner_module

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    # Starts from which four Adam iterations help both queries (asserted below: the case needs
    # a feature phase that helped; from others the tiny field's features do not help).
    init = perturb_poses(gt, 3.0, 0.05, seed=7)
    base = dict(iters=4, coarse_iters=0, search_pad=0.0)  # nefes: Adam, then a Levenberg-Marquardt polish
    plain = Refiner(model, RefineConfig.preset("nefes", **base, polish_iters=0)).refine(images, K, init)
    shift = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])  # half a metre along the camera's x axis

    def far_polish(model, K, init, target, height, width, stride, iters, delta, failed, counts, *rest, **kw):
        delta += shift.to(delta)  # constructed: a polish that moves every pose far away
        return torch.ones(delta.shape[0], dtype=torch.bool)

    monkeypatch.setattr(refiner_module, "levenberg_marquardt_phase", far_polish)
    # polish_rays 0: the polish fits every pixel (a subset is judged on all: test_polish).
    polish = dict(base, polish_iters=1, polish_levels=1, polish_rays=0)
    res = Refiner(model, RefineConfig.preset("nefes", **polish, verify_rays=0)).refine(images, K, init)  # losses only
    checked = Refiner(model, RefineConfig.preset("nefes", **polish)).refine(images, K, init)  # and the query's pixels
    for i, d in enumerate(res.diagnostics):
        # the pixels see what the losses cannot: the far pose matches the query worse
        assert checked.diagnostics[i].status == "kept_initial" and checked.diagnostics[i].rejected_by_pixels
        np.testing.assert_allclose(checked.poses[i], init[i], atol=1e-6)
        assert plain.diagnostics[i].status in ("converged", "max_iters")  # the feature phase helped
        assert d.final_loss > d.initial_loss  # the case this is about: features worse at the result
        assert d.status == "converged"
        moved, _ = pose_errors(res.poses[i : i + 1], plain.poses[i : i + 1])
        assert moved[0] > 0.4  # the polished pose was returned, not the initial or the feature result


def test_batched_and_single_agree(tiny_run, tiny_scene):
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 3)
    init = perturb_poses(gt, 2.0, 0.03, seed=2)
    # Few iterations: a render's sample choices are thresholds, so float rounding that differs
    # with the batch's shape can flip one and trajectories then part slowly; a mixed-up row,
    # shared optimiser state or cross-talk in the batched render moves a pose by whole steps.
    # The rotation search is checked on its own (test_rotation_search); polish iterations far
    # from the truth part trajectories further, so this keeps a short polish of two
    # levels (with a third, stride-8 level one query, sent 22 cm away, parted by 1.6 cm). The
    # polish's steps compose on the current pose, and rounding parts the runs by up to 6% of
    # the move (1.07 cm / 0.26 deg of 29 cm / 4.2 deg on 2 threads): 10% still tells that from
    # cross-talk, which moves poses by whole steps.
    cfg = RefineConfig(iters=5, coarse_iters=2, verify=False, search_pad=0.0, polish_iters=8, polish_levels=2)
    batched = Refiner(model, cfg).refine(images, K, init)
    moved_t, moved_r = pose_errors(batched.poses, init)
    assert np.all(moved_r > 0.2)  # the comparison means something: every query moved
    for i in range(3):
        single = Refiner(model, cfg).refine(images[i : i + 1], K[i : i + 1], init[i : i + 1])
        dt, dr = pose_errors(single.poses, batched.poses[i : i + 1])
        assert dt[0] < 0.1 * moved_t[i] and dr[0] < 0.1 * moved_r[i], (dt, dr, moved_t[i], moved_r[i])
        assert single.diagnostics[0].iterations == batched.diagnostics[i].iterations


def test_restarts_keep_each_querys_lowest_loss_run(tiny_run, tiny_scene):
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 3)
    init = perturb_poses(gt, 3.0, 0.05, seed=3)
    base = dict(iters=6, coarse_iters=3, polish_iters=0, verify=False, search_pad=0.0)
    first = Refiner(model, RefineConfig(**base)).refine(images, K, init)
    again = Refiner(model, RefineConfig(**{**base, "coarse_iters": 0})).refine(images, K, init)  # restart 1's settings
    both = Refiner(model, RefineConfig(**base, restarts=1)).refine(images, K, init)
    for i in range(3):
        a, b = first.diagnostics[i], again.diagnostics[i]
        pick = first if a.final_loss <= b.final_loss else again
        assert both.diagnostics[i].final_loss == pytest.approx(min(a.final_loss, b.final_loss), abs=1e-6)
        assert np.allclose(both.poses[i], pick.poses[i], atol=1e-5)
        assert both.diagnostics[i].iterations == a.iterations + b.iterations


def test_a_turned_query_keeps_the_better_of_the_turned_and_unturned_runs(tiny_run, tiny_scene, monkeypatch):
    from fastnefes.geometry import se3_exp

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 3)
    init = perturb_poses(gt, 3.0, 0.05, seed=4)
    turn = torch.tensor([[0.0, 0.2, 0.0, 0.0, 0.0, 0.0]])  # 11.5 deg about the camera's y axis

    def turn_first_two(self, K, init, target, H, W, phase, initial_loss):  # a constructed search: turns queries 0, 1
        turned = init.clone()
        turned[:2] = init[:2] @ se3_exp(turn.expand(2, 6))
        return turned, initial_loss

    base = dict(iters=6, coarse_iters=3, polish_iters=0, verify=False, search_pad=0.3)
    monkeypatch.setattr(Refiner, "_search_start", turn_first_two)
    alone = Refiner(model, RefineConfig(**base)).refine(images, K, init)
    both = Refiner(model, RefineConfig(**base, search_second_opinion=True)).refine(images, K, init)
    unturned = Refiner(model, RefineConfig(**{**base, "search_pad": 0.0})).refine(images, K, init)
    for i in range(3):
        a, b = alone.diagnostics[i], unturned.diagnostics[i]
        if i == 2:  # not turned: one run, as without a second opinion
            assert np.allclose(both.poses[i], alone.poses[i], atol=1e-6)
            assert both.diagnostics[i].iterations == a.iterations
            continue
        pick = alone if a.final_loss <= b.final_loss else unturned
        assert both.diagnostics[i].final_loss == pytest.approx(min(a.final_loss, b.final_loss), abs=1e-5)
        assert np.allclose(both.poses[i], pick.poses[i], atol=1e-4)
        assert both.diagnostics[i].iterations == a.iterations + b.iterations
    # The 11.5-degree turn is far outside what 6 iterations undo: the unturned run wins for both.
    assert all(unturned.diagnostics[i].final_loss < alone.diagnostics[i].final_loss for i in range(2))


def test_verification_keeps_the_initial_pose_when_the_loss_gets_worse(tiny_run, tiny_scene, monkeypatch):
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    refiner = Refiner(model, RefineConfig(iters=3, coarse_iters=0))
    calls = {"n": 0}
    real = refiner.loss

    def worse_every_time(rendered, target, signal=None):  # constructed: the loss only ever grows
        calls["n"] += 1
        return real(rendered, target, signal) * 0 + calls["n"]

    monkeypatch.setattr(refiner, "loss", worse_every_time)
    res = refiner.refine(images, K, gt)
    assert np.array_equal(res.poses, gt.astype(np.float64)) or np.allclose(res.poses, gt, atol=1e-6)
    assert [d.status for d in res.diagnostics] == ["kept_initial", "kept_initial"]


@pytest.mark.parametrize("method", ["adam", "lm"])
def test_nan_loss_returns_the_initial_pose_flagged_failed(tiny_run, tiny_scene, monkeypatch, method):
    """A query whose feature loss turns non-finite stops, flagged failed, at its initial pose.
    The NaN goes in where each feature phase computes its loss: Adam's through Refiner.loss (with
    gradients), Levenberg-Marquardt's through feature_equations (it never calls Refiner.loss)."""
    import fastnefes.refine.feature_gauss_newton as fgn

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    refiner = Refiner(model, RefineConfig(method=method, iters=4, coarse_iters=0))
    nan = torch.tensor([1.0, float("nan")])
    real = refiner.loss

    def nan_for_second(rendered, target, signal=None):
        out = real(rendered, target, signal)
        if out.requires_grad and out.shape[0] == 2:
            out = out * nan
        return out

    real_equations = fgn.feature_equations

    def nan_equations_for_second(*args, **kw):
        loss, JtJ, Jtr = real_equations(*args, **kw)
        return (loss * nan if loss.shape[0] == 2 else loss), JtJ, Jtr

    monkeypatch.setattr(refiner, "loss", nan_for_second)
    monkeypatch.setattr(fgn, "feature_equations", nan_equations_for_second)
    res = refiner.refine(images, K, gt)
    assert np.all(np.isfinite(res.poses))
    assert res.diagnostics[1].status == "failed" and np.allclose(res.poses[1], gt[1], atol=1e-6)


def test_apr_target_updates_only_the_copy(tiny_run, tiny_scene):
    from fastnefes.apr import APR, APRConfig

    _, model = tiny_run
    images, K, _ = query_views(tiny_scene, 1)
    apr = APR(APRConfig(), input_hw=(24, 32))
    apr.set_frame(tiny_scene.c2w[tiny_scene.split("train")])
    apr.eval()
    before = {k: v.clone() for k, v in apr.state_dict().items()}
    with pytest.raises(ValueError, match="preset\\('nefes', target='apr'\\)"):  # no warp Jacobian through an APR
        Refiner(model, RefineConfig(target="apr")).refine(images, K, None, apr=apr)
    res = Refiner(model, RefineConfig.preset("nefes", target="apr", iters=3, verify=False, polish_iters=0)).refine(
        images, K, None, apr=apr)
    after = apr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.diagnostics[0].iterations == 3
    assert not np.allclose(res.poses[0], res.initial[0])  # the copy did move


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastnefes", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("option, value, expected", [
    ("--polish-rays", "-1", "greater than or equal to 0"),
    ("--iters", "many", "valid integer"),
    ("--no-such-option", "1", "No such option"),
])
def test_bad_command_line_values_are_one_line_and_exit_2(tmp_path, option, value, expected):
    """Values typer rejects (its click may be a vendored copy, not click's) go the way of every
    user error: one line naming the option, exit code 2, no traceback."""
    r = run_cli("refine", tmp_path / "run", "--data", tmp_path, "--init", tmp_path / "init.txt",
                "--out", tmp_path / "refined.txt", option, value)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert option in lines[0] or option == "--no-such-option"


@pytest.fixture(scope="module")
def tiny_data(tiny_scene, tmp_path_factory):
    """tiny_scene written to disk in the 7-Scenes layout."""
    from fastnefes.data import write_scene

    data = tmp_path_factory.mktemp("tiny_data") / "data"
    write_scene(tiny_scene, data, "7scenes")
    return data


def test_refine_cli_round_trips_through_eval(tiny_run, tiny_data, tmp_path):
    from fastnefes.data import load_scene

    run_dir, _ = tiny_run
    data = tiny_data

    scene = load_scene(data)
    test = scene.split("test")
    gt = {scene.names[i]: scene.c2w[i] for i in test}
    write_poses(tmp_path / "init.txt", dict(zip(gt, perturb_poses(np.stack(list(gt.values())), 2.0, 0.03, seed=0))))
    r = run_cli("refine", run_dir, "--data", data, "--init", tmp_path / "init.txt", "--out", tmp_path / "refined.txt", "--iters", "8",
                "--search-pad", "0.2", "--second-opinion", "--polish-rays", "100", "--polish-levels", "3")
    assert r.returncode == 0, r.stderr
    refined = read_poses(tmp_path / "refined.txt")
    assert list(refined) == list(gt)
    report = json.loads((tmp_path / "refined.json").read_text())
    assert {"p50", "p95"} <= set(report["latency_ms"]) and len(report["queries"]) == len(gt)
    assert report["config"]["search_pad"] == 0.2 and report["config"]["search_second_opinion"] is True
    assert report["config"]["polish_rays"] == 100 and report["config"]["polish_levels"] == 3
    r = run_cli("eval", "--gt", data, "--pred", tmp_path / "refined.txt", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["missing"] == 0
    assert summary["median_trans"] == pytest.approx(report["evaluation"]["after"]["median_trans"], rel=1e-6)
    # An init file naming an image outside the split: one line, exit 2, nothing written.
    (tmp_path / "bad.txt").write_text("nope.png 1 0 0 0 0 0 0\n")
    r = run_cli("refine", run_dir, "--data", data, "--init", tmp_path / "bad.txt", "--out", tmp_path / "x.txt")
    assert r.returncode == 2 and "'nope.png' is not in the test split" in r.stderr and not (tmp_path / "x.txt").exists()


def test_bounds_cli_writes_plot_and_records_per_signal(tiny_run, tiny_data, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "bounds.png"
    r = run_cli("bounds", run_dir, "--data", tiny_data, "--out", out, "--queries", "1", "--iters", "2",
                "--polish-iters", "0", "--search-pad", "0.2", "--second-opinion")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["config"]["search_pad"] == 0.2 and result["config"]["polish_iters"] == 0
    assert result["config"]["search_second_opinion"] is True
    for signal in ("features", "rgb"):
        recs = result["records"][signal]
        assert len(recs) == 12 and {rec["sweep"] for rec in recs} == {"rotation", "translation"}
        rot = [rec for rec in recs if rec["sweep"] == "rotation"]
        # the perturbation really has the swept size
        assert [round(rec["before_rot_deg"], 3) for rec in rot] == [2.0, 5.0, 10.0, 15.0, 20.0, 30.0]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("bounds", run_dir, "--data", tiny_data, "--out", tmp_path / "b2.png", "--signals", "depth")
    assert r.returncode == 2 and "--signals" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A preset runs its own method; the options still win over it.
    r = run_cli("bounds", run_dir, "--data", tiny_data, "--out", tmp_path / "b3.png", "--queries", "1", "--signals",
                "features", "--preset", "direct", "--iters", "2", "--polish-iters", "0")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b3.json").read_text())
    assert result["config"]["method"] == "direct" and result["config"]["iters"] == 2
    assert set(result["records"]) == {"features"} and len(result["records"]["features"]) == 12
    r = run_cli("bounds", run_dir, "--data", tiny_data, "--out", tmp_path / "b4.png", "--preset", "nope")
    assert r.returncode == 2 and "refine preset 'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
