"""The `--arch mlp` baseline: NeRF's sampler against references, the field, training and refinement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastnefes.field.nerf_mlp import NeRFGeometryField, frequency_encoding
from fastnefes.ops.composite import composite
from fastnefes.ops.hierarchical import (dense_weights, merge_edges, ray_range_in_unit_cube, sample_pdf,
                                        stratified_edges)

MLP_SMALL = {"mlp_width": 32, "mlp_depth": 3, "mlp_skip": 2, "coarse_samples": 16, "fine_samples": 16}


def test_frequency_encoding_values():
    x = torch.tensor([[0.25, -0.5, 1.0]])
    enc = frequency_encoding(x, 3)
    assert enc.shape == (1, 3 * (1 + 2 * 3))
    torch.testing.assert_close(enc[0, :3], x[0])
    k, c = 2, 1  # sin(2^k pi x_c) sits at 3 + k*3 + c
    assert math.isclose(float(enc[0, 3 + 3 * k + c]), math.sin(4 * math.pi * -0.5), abs_tol=1e-6)
    assert math.isclose(float(enc[0, 3 + 9 + 3 * k + c]), math.cos(4 * math.pi * -0.5), abs_tol=1e-6)


def test_nerf_geometry_field_shapes_and_skip():
    field = NeRFGeometryField(n_freqs=4, width=16, depth=4, skip=2, geo_feat_dim=5)
    assert field.layers[2].in_features == 16 + 3 * 9 and field.layers[1].in_features == 16
    out = field(torch.rand(7, 3))
    assert out.density.shape == (7,) and out.geo_features.shape == (7, 5) and out.encoding.shape == (7, 16)
    assert bool((out.density > 0).all())


def test_ray_range_and_stratified_edges():
    o = torch.tensor([[0.5, 0.5, 0.5], [-1.0, 0.5, 0.5], [-1.0, 5.0, 0.5]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    t0, t1 = ray_range_in_unit_cube(o, d, near=0.1)
    torch.testing.assert_close(t0, torch.tensor([0.1, 1.0, t0[2].item()]))
    torch.testing.assert_close(t1[:2], torch.tensor([0.5, 2.0]))
    assert float(t1[2] - t0[2]) == 0.0  # a miss: zero-length span
    torch.manual_seed(0)
    for stratified in (False, True):
        e = stratified_edges(t0, t1, 8, stratified)
        assert e.shape == (3, 9) and bool((e[:, 1:] >= e[:, :-1]).all())
        torch.testing.assert_close(e[:, 0], t0)
        torch.testing.assert_close(e[:, -1], t1)


def test_sample_pdf_inverts_the_piecewise_constant_cdf():
    edges = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    weights = torch.tensor([[1.0, 0.0, 3.0]])
    t = sample_pdf(edges, weights, 8, stratified=False)
    # Reference: quantiles u = (i + 0.5) / 8 of the mixture (1/4 uniform on [0,1], 3/4 on [2,4]),
    # with NeRF's 1e-5 weight floor (negligible at this tolerance).
    u = (torch.arange(8) + 0.5) / 8
    ref = torch.where(u < 0.25, u / 0.25, 2.0 + (u - 0.25) / 0.75 * 2.0)
    torch.testing.assert_close(t[0], ref, atol=1e-3, rtol=0)
    torch.manual_seed(0)
    many = sample_pdf(edges.expand(2000, -1), weights.expand(2000, -1), 4, stratified=True)
    assert bool((many[:, 1:] >= many[:, :-1]).all())
    frac_first = float((many < 1.0).float().mean())
    assert abs(frac_first - 0.25) < 0.02 and float(((many > 1.0) & (many < 2.0)).float().mean()) < 0.01


def test_dense_weights_match_the_packed_compositor():
    torch.manual_seed(1)
    R, K = 5, 12
    edges = torch.cumsum(torch.rand(R, K + 1) * 0.1, dim=1)
    sigmas = torch.rand(R, K) * 20
    w = dense_weights(sigmas, edges)
    ray_idx = torch.arange(R).repeat_interleave(K)
    out = composite(sigmas.reshape(-1), torch.ones(R * K, 3), None, edges[:, :-1].reshape(-1), edges[:, 1:].reshape(-1),
                    ray_idx, R, detach_feature_weights=False)
    torch.testing.assert_close(w.sum(1), out.opacity, atol=1e-5, rtol=1e-5)
    merged = merge_edges(edges, torch.rand(R, 4) * 0.5)
    assert merged.shape == (R, K + 5) and bool((merged[:, 1:] >= merged[:, :-1]).all())


@pytest.fixture(scope="module")
def mlp_run(tiny_scene, tmp_path_factory):
    from fastnefes.train.config import TrainConfig
    from fastnefes.train.run import train

    cfg = TrainConfig.for_arch("mlp", steps=40, batch_rays=256, val_every=0, log_every=1)
    for key, value in MLP_SMALL.items():
        setattr(cfg.model, key, value)
    cfg.model.encoder_stride, cfg.model.feature_dim, cfg.model.encoder_width = 4, 8, 8
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    model, metrics = train(tiny_scene, cfg, run_dir)
    return run_dir, model, metrics


def test_mlp_arch_trains_saves_and_loads(mlp_run, tiny_scene):
    from fastnefes.render import render_rays
    from fastnefes.train.run import load_run

    run_dir, model, metrics = mlp_run
    losses = [h["rgb"] for h in metrics["history"] if h["stage"] == 0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns
    assert model.coarse is not None and type(model.geometry).__name__ == "NeRFGeometryField"
    loaded, cfg = load_run(run_dir)
    assert cfg.model.arch == "mlp"
    rays_o = torch.zeros(4, 3) + torch.as_tensor(tiny_scene.c2w[0][:3, 3], dtype=torch.float32)
    rays_d = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    with torch.no_grad():
        a, b = render_rays(model, rays_o, rays_d), render_rays(loaded, rays_o, rays_d)
    torch.testing.assert_close(a["rgb"], b["rgb"])
    n = MLP_SMALL["coarse_samples"] + MLP_SMALL["fine_samples"]
    assert int(a["n_samples"]) == 4 * n and int(a["n_candidates"]) == 4 * MLP_SMALL["coarse_samples"]


def test_mlp_arch_gives_pose_gradients(mlp_run, tiny_scene):
    from fastnefes.geometry import se3_exp
    from fastnefes.refine import Refiner

    _, model, _ = mlp_run
    refiner = Refiner(model)
    i = tiny_scene.split("test")[0]
    K = torch.as_tensor(tiny_scene.K[i:i + 1], dtype=torch.float32)
    c2w = torch.as_tensor(tiny_scene.c2w[i:i + 1], dtype=torch.float32)
    target = refiner.encode_queries(tiny_scene.image(i)[None])
    H, W = tiny_scene.image(i).shape[:2]
    delta = torch.zeros(1, 6, requires_grad=True)
    with refiner.frozen_model():
        loss = refiner._loss_at(K, c2w @ se3_exp(delta), target, H, W, refiner.stride())
        grad, = torch.autograd.grad(loss.sum(), delta)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
