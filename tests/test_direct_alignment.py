"""Direct alignment against rendered keyframes: the warp's normal equations against finite
differences of its own loss, the projection Jacobian, and the phase on a trained tiny field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnefes.geometry import invert_pose, perturb_poses, pose_errors, se3_exp, world_to_camera
from fastnefes.refine import RefineConfig, Refiner
from fastnefes.refine.direct_alignment import (map_with_gradient, mean_shift, projection_jacobian, sample_map,
                                               warp_equations)

from conftest import field_views, query_views


def _ramp_scene(B: int = 2, C: int = 3, h: int = 30, w: int = 40, stride: int = 4, N: int = 150):
    """A map affine in image coordinates (central differences and bilinear sampling are then
    exact), world points seen by cameras at P, and values offset from the map's."""
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(B, C, 3, generator=g, dtype=torch.float64)
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) * stride
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) * stride
    query = coef[..., 0, None, None] * cols / 100 + coef[..., 1, None, None] * rows[:, None] / 100 + coef[..., 2, None, None]
    K = torch.tensor([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]], dtype=torch.float64).expand(B, 3, 3)
    P = torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)
    P[:, :3, 3] = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    uv = torch.rand(B, N, 2, generator=g, dtype=torch.float64) * torch.tensor([120.0, 80.0], dtype=torch.float64) + 20
    z = 1 + torch.rand(B, N, generator=g, dtype=torch.float64)
    cam = torch.stack([(uv[..., 0] - 80) / 100 * z, (uv[..., 1] - 60) / 100 * z, z], -1)
    points = cam @ P[:, :3, :3].transpose(-1, -2) + P[:, None, :3, 3]
    values = 0.1 * torch.randn(B, N, C, generator=g, dtype=torch.float64)
    return map_with_gradient(query, stride), stride, K, P, points, values


def test_projection_jacobian_matches_finite_differences():
    y = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.5, 3.0]], dtype=torch.float64)
    fx, fy = torch.tensor(120.0, dtype=torch.float64), torch.tensor(90.0, dtype=torch.float64)

    def project(step):  # the point seen from a camera moved by the local increment step
        y2 = (invert_pose(se3_exp(step))[:3, :3] @ y.t()).t() + invert_pose(se3_exp(step))[:3, 3]
        return torch.stack([fx * y2[:, 0] / y2[:, 2], fy * y2[:, 1] / y2[:, 2]], -1)

    eps = 1e-6
    numeric = torch.stack([(project(torch.eye(6, dtype=torch.float64)[k] * eps)
                            - project(-torch.eye(6, dtype=torch.float64)[k] * eps)) / (2 * eps) for k in range(6)], -1)
    assert torch.allclose(projection_jacobian(y, fx, fy), numeric, atol=1e-5)


def test_warp_normal_equations_match_the_loss_gradient():
    stack, stride, K, P, points, values = _ramp_scene()
    valid = torch.ones(points.shape[:2], dtype=torch.bool)
    valid[:, ::7] = False  # masked points take no part
    poses = P @ se3_exp(torch.tensor([[0.01, -0.02, 0.015, 0.02, 0.01, -0.01]], dtype=torch.float64).expand(2, 6))
    for scale2 in (torch.full((2,), 1e8, dtype=torch.float64), torch.full((2,), 0.05, dtype=torch.float64)):
        loss, A, g = warp_equations(stack, stride, K, poses, points, values, valid, scale2)
        n = valid.sum(1).double()

        def f(step):
            return warp_equations(stack, stride, K, poses @ se3_exp(step), points, values, valid, scale2)[0]

        eps = 1e-6
        grad = torch.stack([(f(torch.eye(6, dtype=torch.float64)[k].expand(2, 6) * eps)
                             - f(-torch.eye(6, dtype=torch.float64)[k].expand(2, 6) * eps)) / (2 * eps)
                            for k in range(6)], -1)
        # loss = mean c^2 log(1 + r^2 / c^2): its gradient is 2 / n J^T W r (W the IRLS weights)
        assert torch.allclose(grad * n[:, None] / 2, g, rtol=1e-4, atol=1e-6)
        assert torch.allclose(A, A.transpose(1, 2)) and bool((torch.linalg.eigvalsh(A) > -1e-9).all())
    # The normal equations are J^T W J of the per-channel rows (map gradient times projection).
    sampled, du, dv, _ = sample_map(stack, _project(K, poses, points), stride)
    y = world_to_camera(points, poses)
    Pj = projection_jacobian(y, K[:, None, 0, 0], K[:, None, 1, 1])
    J = du[..., None] * Pj[:, :, None, 0] + dv[..., None] * Pj[:, :, None, 1]  # [B, N, C, 6]
    r2 = (sampled - values).pow(2).sum(-1)
    weight = valid / (1 + r2 / 0.05)
    assert torch.allclose(torch.einsum("bnci,bn,bncj->bij", J, weight, J), A, rtol=1e-8)


def _project(K, poses, points):
    y = world_to_camera(points, poses)
    return torch.stack([K[:, None, 0, 0] * y[..., 0] / y[..., 2] + K[:, None, 0, 2],
                        K[:, None, 1, 1] * y[..., 1] / y[..., 2] + K[:, None, 1, 2]], -1)


def test_points_leaving_the_map_are_charged_and_shifts_measured():
    stack, stride, K, P, points, _ = _ramp_scene(N=40)
    values = sample_map(stack, _project(K, P, points), stride)[0]  # what the map holds there: residual 0
    valid = torch.ones(points.shape[:2], dtype=torch.bool)
    far = P @ se3_exp(torch.tensor([[0.0, 0.6, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64).expand(2, 6))
    scale2 = torch.full((2,), 0.05, dtype=torch.float64)
    near_loss = warp_equations(stack, stride, K, P, points, values, valid, scale2)[0]
    far_loss = warp_equations(stack, stride, K, far, points, values, valid, scale2)[0]
    # turned 34 deg, most points leave the view: each is charged the keyframe's median residual
    # (scale2 / 2), neither more (a step off the border would jump) nor nothing (leaving would pay)
    seen = (_project(K, far, points)[..., 0] - 80).abs() < 80
    assert torch.allclose(near_loss, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert bool((far_loss >= (~seen).double().mean(1) * 0.05 * np.log1p(0.5) - 1e-12).all())
    assert bool((far_loss > 0).all())
    turn = torch.tensor([[0.0, 0.01, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64).expand(2, 6)
    shift = mean_shift(K, P, turn, points, valid)  # a 0.01 rad pan moves points about f * 0.01 px
    assert torch.allclose(shift, torch.full((2,), 1.0, dtype=torch.float64), rtol=0.2)


@pytest.mark.parametrize("seed", [1, 2])
def test_direct_preset_refines_the_tiny_field(tiny_run, tiny_scene, seed):
    """The direct preset's whole pipeline from 5 cm / 3 deg on views the tiny field renders itself
    (its minima are then at the truth), in a few renders per query: every pose it returns as
    refined is closer to the truth, most of them by far, and none comes back worse."""
    _, model = tiny_run
    _, K, gt = query_views(tiny_scene)
    images = field_views(model, K, gt, tiny_scene.hw[0])
    init = perturb_poses(gt, 3.0, 0.05, seed=seed)
    cfg = RefineConfig.preset("direct")
    result = Refiner(model, cfg).refine(images, K, init)
    t0, r0 = pose_errors(init, gt)
    t1, r1 = pose_errors(result.poses, gt)
    refined = np.array([d.status in ("converged", "max_iters") for d in result.diagnostics])
    assert refined.sum() >= len(gt) - 1, [d.status for d in result.diagnostics]
    assert np.all(t1[refined] < t0[refined]) and np.all(r1[refined] < 0.5 * r0[refined]), (t1, r1)
    assert np.all(t1 <= t0 + 1e-9) and np.all(r1 <= r0 + 1e-9)
    assert np.median(t1[refined]) < 0.3 * np.median(t0) and np.median(r1[refined]) < 0.15 * np.median(r0), (t1, r1)
    assert max(d.iterations for d in result.diagnostics) <= cfg.iters + cfg.polish_iters * cfg.polish_levels


@pytest.mark.parametrize("judge", ["grid", "keyframes"])
def test_a_polish_whose_keyframes_never_beat_the_start_returns_it_flagged(tiny_run, tiny_scene, monkeypatch, judge):
    """Constructed: every keyframe after a query's first renders a higher loss than its first. A
    polish-only refinement (tracking's kind) then returns the start itself, bit for bit, flagged
    kept_initial, whichever judge it has; with polish_judge "keyframes" nothing else renders to
    judge it."""
    import fastnefes.refine.direct_alignment as direct_module
    from fastnefes.refine.track import TRACK_FRAME, refine_config

    _, model = tiny_run
    _, K, gt = query_views(tiny_scene, 2)
    images = field_views(model, K, gt, tiny_scene.hw[0])
    init = perturb_poses(gt, 1.0, 0.01, seed=3)
    render_keyframe, renders = direct_module.render_keyframe, []

    def worse_after_the_first(*args, **kw):
        out = render_keyframe(*args, **kw)
        renders.append(1)
        return (*out[:4], out[4] + (1.0 if len(renders) > 1 else 0.0))

    monkeypatch.setattr(direct_module, "render_keyframe", worse_after_the_first)
    cfg = refine_config({**TRACK_FRAME, "polish_stride": 1, "polish_judge": judge})
    for i in range(len(gt)):
        renders.clear()
        result = Refiner(model, cfg).refine(images[i : i + 1], K[i : i + 1], init[i : i + 1])
        assert result.diagnostics[0].status == "kept_initial" and len(renders) >= 2
        assert np.array_equal(result.poses[0], init[i].astype(np.float32).astype(np.float64))  # refine's float32 start
