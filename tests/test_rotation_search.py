"""Rotation search: window losses against a loop, the map turn and Kabsch against constructed
cases, and the whole search on the tiny trained field (views of the field itself as queries)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastnefes.geometry import perturb_poses, pose_errors, so3_exp
from fastnefes.refine.losses import feature_metric_loss
from fastnefes.refine.rotation_search import (rotation_between, search_rotation, turn_map, window_losses,
                                              window_turns)


def test_window_losses_match_a_loop_over_shifts():
    torch.manual_seed(0)
    rendered = torch.randn(2, 4, 9, 11)
    valid = (torch.rand(2, 1, 5, 7) > 0.3).float()
    query = torch.randn(2, 4, 5, 7) * valid
    cos = window_losses(rendered, query, valid, "features")
    mse = window_losses(rendered.abs(), query.abs(), valid, "rgb")
    assert cos.shape == mse.shape == (2, 5, 5)
    for u in range(5):
        for v in range(5):
            win = rendered[..., u : u + 5, v : v + 7]
            want = feature_metric_loss(win, query, "cosine", valid[:, 0] > 0)
            assert torch.allclose(cos[:, u, v], want, atol=1e-5)
            sq = ((win.abs() - query.abs()) ** 2 * valid).flatten(1).sum(1) / (valid.flatten(1).sum(1) * 4)
            assert torch.allclose(mse[:, u, v], sq, atol=1e-5)
    with pytest.raises(ValueError, match="unknown signal"):
        window_losses(rendered, query, valid, "depth")


def test_turn_map_moves_content_clockwise_on_screen_and_marks_the_corners_invalid():
    # A positive turn takes image x (right) to y (down): a marker right of the centre goes below it.
    q = torch.zeros(1, 1, 8, 8)
    q[0, 0, 3:5, 6] = 1.0  # right of centre
    turned, valid = turn_map(q, math.radians(90))
    assert torch.allclose(turned[0, 0], torch.rot90(q[0, 0], k=-1), atol=1e-5)
    assert bool((valid == 1).all())  # a square turned by 90 deg covers itself
    _, valid45 = turn_map(q, math.radians(45))
    assert valid45[0, 0, 0, 0] == 0 and valid45[0, 0, 4, 4] == 1
    same, ones = turn_map(q, 0.0)
    assert torch.equal(same, q) and bool((ones == 1).all())


def test_rotation_between_recovers_a_rotation():
    torch.manual_seed(1)
    R = so3_exp(torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0]]))
    src = torch.nn.functional.normalize(torch.randn(2, 40, 3), dim=-1)
    dst = (R[:, None] @ src[..., None])[..., 0]
    assert torch.allclose(rotation_between(src, dst), R, atol=1e-5)


def test_window_turns_are_distinct_local_minima_lowest_first():
    losses = torch.full((1, 2, 5, 5), 1.0)
    losses[0, 0, 2, 2], losses[0, 0, 2, 3] = 0.1, 0.2  # 0.2 neighbours 0.1: not a minimum of its own
    losses[0, 1, 0, 4] = 0.3
    values, index = window_turns(losses, 3)
    assert values[0, :2].tolist() == pytest.approx([0.1, 0.3])
    assert index[0, 0].tolist() == [0, 2, 2] and index[0, 1].tolist() == [1, 0, 4]


@pytest.mark.parametrize("signal", ["features", "rgb"])
def test_search_turns_the_camera_back_to_the_view(tiny_run, tiny_scene, signal):
    """Queries are the field's own renders at the truth, so the truth is the best turn; the
    camera is turned 12 deg about random axes (a few deg of roll) and must come back."""
    from fastnefes.refine import RefineConfig, Refiner
    from fastnefes.render import render_image

    _, model = tiny_run
    idx = tiny_scene.split("test")[:3]
    gt = torch.as_tensor(tiny_scene.c2w[idx], dtype=torch.float32)
    K = torch.as_tensor(tiny_scene.K[idx], dtype=torch.float32)
    (H, W), stride = tiny_scene.image(int(idx[0])).shape[:2], 2
    with torch.no_grad():
        out = render_image(model, K, gt, H, W, stride=stride, fused=signal == "features")
    query = out["fused" if signal == "features" else "rgb"].permute(0, 3, 1, 2)
    init = torch.as_tensor(perturb_poses(gt.double().numpy(), 12.0, 0.0, seed=4), dtype=torch.float32)
    poses, values = search_rotation(model, query, K, init, H, W, stride, pad=0.35, roll_deg=(-10.0, 0.0, 10.0),
                                    candidates=4, signal=signal)
    assert poses.shape == (3, 4, 4, 4) and bool((values[:, 1:] >= values[:, :-1]).all())
    refiner = Refiner(model, RefineConfig(signal=signal, stride=stride, search_pad=0.35, search_roll_steps=3))
    with torch.no_grad():
        loss0 = refiner._loss_at(K, init, query, H, W, stride, signal=signal)
        start, reported = refiner._search_start(K, init, query, H, W, refiner.phases()[0], loss0)
        loss1 = refiner._loss_at(K, start, query, H, W, stride, signal=signal)
    assert torch.allclose(reported, loss1, atol=1e-5)
    t_before, r_before = pose_errors(init.double().numpy(), gt.double().numpy())
    t_after, r_after = pose_errors(start.double().numpy(), gt.double().numpy())
    assert np.allclose(t_after, t_before, atol=1e-6)  # the search only turns the camera
    assert np.all(r_after < 0.25 * r_before), (r_before, r_after)
    assert bool((loss1 < loss0).all())


def test_search_start_does_not_depend_on_the_batch(tiny_run, tiny_scene):
    from fastnefes.refine import RefineConfig, Refiner

    _, model = tiny_run
    idx = tiny_scene.split("test")[:3]
    images = np.stack([tiny_scene.image(i) for i in idx])
    K = torch.as_tensor(tiny_scene.K[idx], dtype=torch.float32)
    init = torch.as_tensor(perturb_poses(tiny_scene.c2w[idx], 8.0, 0.05, seed=5), dtype=torch.float32)
    refiner = Refiner(model, RefineConfig())
    target = refiner.encode_queries(images)
    H, W = images.shape[1:3]
    with torch.no_grad():
        loss0 = refiner._loss_at(K, init, target, H, W, refiner.stride())
        batched, _ = refiner._search_start(K, init, target, H, W, refiner.phases()[0], loss0)
        for i in range(3):
            one, _ = refiner._search_start(K[i : i + 1], init[i : i + 1], target[i : i + 1], H, W,
                                           refiner.phases()[0], loss0[i : i + 1])
            assert torch.allclose(one[0], batched[i], atol=1e-5)
    assert bool((batched != init).any())  # the search turned at least one camera
