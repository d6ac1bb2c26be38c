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
    assert bool((came_back.psnr_refined > came_back.psnr_initial).all())
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
