"""Match-then-solve: mutual nearest neighbours and PnP-RANSAC against constructed cases."""

from __future__ import annotations

import numpy as np
import torch

from fastnefes.geometry import perturb_poses, pose_errors
from fastnefes.refine.matching import mutual_matches, solve_pnp


def test_mutual_matches_finds_the_permutation_and_respects_validity():
    torch.manual_seed(0)
    query = torch.randn(50, 16)
    perm = torch.randperm(50)
    rendered = query[perm] + 0.01 * torch.randn(50, 16)
    valid = torch.ones(50, dtype=torch.bool)
    valid[:5] = False
    r, q = mutual_matches(rendered, query, valid)
    assert len(r) == 45 and bool((q == perm[r]).all()) and not bool((r < 5).any())
    # Two rendered pixels wanting the same query cell: only the closer one is mutual.
    rendered2 = torch.stack([query[0], query[0] * 0.9 + 0.1 * query[1]])
    r, q = mutual_matches(rendered2, query, torch.ones(2, dtype=torch.bool))
    assert r.tolist() == [0] and q.tolist() == [0]
    empty_r, _ = mutual_matches(rendered, query, torch.zeros(50, dtype=torch.bool))
    assert empty_r.numel() == 0


def test_solve_pnp_recovers_the_pose_despite_outliers():
    rng = np.random.default_rng(0)
    K = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    c2w = np.eye(4)
    c2w[:3, 3] = [0.2, -0.1, -3.0]
    cam = np.stack([rng.uniform(-1, 1, 80), rng.uniform(-1, 1, 80), rng.uniform(2, 5, 80)], 1)
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    pix = cam[:, :2] / cam[:, 2:] * 100 + [80, 60]
    pix += rng.normal(0, 0.3, pix.shape)
    pix[:20] = rng.uniform(0, 160, (20, 2))  # 25 % outliers
    pose, n = solve_pnp(world, pix, K, reproj_px=3.0, min_inliers=12)
    assert pose is not None and n >= 55
    t_err, r_err = pose_errors(pose[None], c2w[None])
    assert t_err[0] < 0.05 and r_err[0] < 0.5
    none, n = solve_pnp(world[:5], pix[:5], K, reproj_px=3.0, min_inliers=12)
    assert none is None


def test_matching_only_replaces_the_start_when_it_lowers_the_loss(tiny_run, tiny_scene):
    """Whatever PnP returns, the refiner's start pose has a feature loss no higher than the initial."""
    from fastnefes.refine import RefineConfig, Refiner

    _, model = tiny_run
    refiner = Refiner(model, RefineConfig(match_rounds=2))  # off by default: turned on here
    idx = tiny_scene.split("test")[:3]
    images = np.stack([tiny_scene.image(i) for i in idx])
    K = torch.as_tensor(tiny_scene.K[idx], dtype=torch.float32)
    init = torch.as_tensor(perturb_poses(tiny_scene.c2w[idx], 8.0, 0.2, seed=1), dtype=torch.float32)
    H, W = images.shape[1:3]
    target = refiner.encode_queries(images)
    with torch.no_grad():
        loss0 = refiner._loss_at(K, init, target, H, W, refiner.stride())
        start = refiner._match_start(K, init, target, H, W, refiner.stride(), loss0)
        loss1 = refiner._loss_at(K, start, target, H, W, refiner.stride())
    assert bool((loss1 <= loss0 + 1e-6).all())
    moved = (start - init).abs().flatten(1).amax(1) > 0
    assert bool((loss1[moved] < loss0[moved]).all())
