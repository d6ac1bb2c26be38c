"""Verification: the query's own pixels decide between the initial and the refined pose."""

from __future__ import annotations

import numpy as np
import torch

from conftest import query_views
from fastnefes.geometry import perturb_poses
from fastnefes.refine.verify import verification_stride, verify_refinement


def test_verification_prefers_the_pose_whose_rendering_matches_the_query(tiny_scene, tiny_run):
    _, model = tiny_run
    images, K, truth = query_views(tiny_scene, 4)
    scale = 1.0 / float(model.normalization.scale)
    away = perturb_poses(truth, 6.0, 0.08 * scale, seed=1)
    K_t, truth_t, away_t = (torch.as_tensor(a, dtype=torch.float32) for a in (K, truth, away))
    moved_away = verify_refinement(model, images, K_t, truth_t, away_t)
    assert not bool(moved_away.accept.any())  # refined further from the truth: every query keeps its start
    came_back = verify_refinement(model, images, K_t, away_t, truth_t)
    assert bool(came_back.accept.all())
    assert bool((came_back.ssim_refined > came_back.ssim_initial).all())
    # PSNR is reported, not decided on: on this tiny field a colour offset can favour a wrong pose
    # in one view, but over the views it favours the truth.
    assert bool(torch.isfinite(came_back.psnr_refined).all() and torch.isfinite(came_back.psnr_initial).all())
    assert float(came_back.psnr_refined.mean()) > float(came_back.psnr_initial.mean()) + 1.0
    # the confidence is that of the returned pose: the truth in both cases
    np.testing.assert_allclose(moved_away.confidence.numpy(), came_back.confidence.numpy(), atol=1e-5)
    assert bool((came_back.coverage > 0.1).all()) and bool((came_back.confidence <= 1).all())


def test_no_overlap_is_not_accepted(tiny_scene, tiny_run):
    _, model = tiny_run
    images, K, truth = query_views(tiny_scene, 1)
    behind = truth.copy()
    behind[:, :3, 3] = 1e4  # far outside the scene, looking at nothing the field holds
    verdict = verify_refinement(model, images, torch.as_tensor(K, dtype=torch.float32),
                                torch.as_tensor(truth, dtype=torch.float32), torch.as_tensor(behind, dtype=torch.float32))
    assert not bool(verdict.accept[0])


def test_verification_stride():
    assert verification_stride(480, 640, 4800) == 8
    assert verification_stride(120, 160, 4800) == 2
    assert verification_stride(10, 10, 4800) == 1


def test_refinement_led_away_from_the_truth_comes_back_flagged(tiny_scene, tiny_run):
    """A feature loss whose minimum is not at the truth (here: the query's features replaced by
    those the field renders at another pose) pulls the pose away; the pixels catch it."""
    from dataclasses import replace

    from fastnefes.geometry import pose_errors
    from fastnefes.refine import RefineConfig, Refiner

    _, model = tiny_run
    images, K, truth = query_views(tiny_scene, 3)
    H, W = images.shape[1:3]
    scale = 1.0 / float(model.normalization.scale)
    start = perturb_poses(truth, 1.0, 0.01 * scale, seed=2)
    lure = perturb_poses(truth, 6.0, 0.06 * scale, seed=3)
    cfg = RefineConfig(iters=40, coarse_iters=0, polish_iters=0, search_pad=0.0)

    def lured(config):
        refiner = Refiner(model, config)

        def encode(imgs, signal=None, stride=None):
            with torch.no_grad():
                return refiner.render_signal(torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(lure, dtype=torch.float32),
                                             H, W, stride or refiner.stride(), signal).detach()

        refiner.encode_queries = encode
        return refiner.refine(images, K, start)

    t0, r0 = pose_errors(start, truth)
    unchecked = lured(replace(cfg, verify_rays=0))
    t1, r1 = pose_errors(unchecked.poses, truth)
    moved_away = (t1 > t0 + 0.01 * scale) | (r1 > r0 + 0.5)
    assert moved_away.any(), (t0, t1, r0, r1)  # the lure works: without the pixel check poses get worse
    assert all(d.status in ("converged", "max_iters") for d, m in zip(unchecked.diagnostics, moved_away) if m)

    checked = lured(cfg)
    t2, r2 = pose_errors(checked.poses, truth)
    for i, d in enumerate(checked.diagnostics):
        assert d.confidence is not None and 0.0 <= d.confidence <= 1.0
        if moved_away[i]:
            assert d.status == "kept_initial" and d.rejected_by_pixels, d
            np.testing.assert_allclose(checked.poses[i], start[i], atol=1e-6)
    assert not ((t2 > t0 + 0.01 * scale) | (r2 > r0 + 0.5)).any(), (t0, t2, r0, r2)  # nothing worse is returned unflagged
