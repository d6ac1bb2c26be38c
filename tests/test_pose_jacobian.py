"""Forward-mode pose Jacobians, surface-guided sampling and the feature phase's Gauss-Newton
system: each against its reference (autograd, reverse mode, the full march)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastnefes.geometry import perturb_poses, pixel_grid, se3_exp
from fastnefes.refine.feature_gauss_newton import feature_equations, fused_with_jacobian
from fastnefes.refine.field_jacobian import field_with_jacobian
from fastnefes.refine.losses import feature_metric_loss
from fastnefes.refine.pose_jacobian import _render_values, render_samples, render_samples_reverse
from fastnefes.refine.refiner import frozen
from fastnefes.refine.surface import RaySampler
from fastnefes.render import render_image

from conftest import query_views, tiny_train_config


@pytest.fixture(scope="module")
def random_field():
    """An untrained hash field with a busy grid and a dense occupancy grid: every derivative is
    far from zero (a trained field's are not everywhere)."""
    from fastnefes.field.model import FeatureFieldModel

    torch.manual_seed(0)
    model = FeatureFieldModel(tiny_train_config().model, SimpleNamespace(center=[0, 0, 0], scale=0.3, near=0.1)).eval()
    with torch.no_grad():
        model.geometry.encoding.params.uniform_(-1, 1)
        model.geometry.mlp[-1].bias[0] += 3.0
        model.occupancy.binaries[:] = True
        bn = model.fusion.net[-1]
        bn.running_var.uniform_(0.5, 2.0), bn.running_mean.uniform_(-1, 1), bn.weight.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cameras(n: int = 2):
    K = torch.tensor([[40.0, 0, 32], [0, 40, 24], [0, 0, 1]]).expand(n, 3, 3).contiguous()
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, :3, 3] = torch.tensor([[-1.0, -1.0, -1.0], [-0.9, -1.2, -0.95]])[:n]
    c2w[0] = c2w[0] @ se3_exp(torch.tensor([0.1, 0.2, -0.1, 0.0, 0.0, 0.0]))
    return K, c2w


@pytest.mark.parametrize("contract", [False, True])
def test_field_tangents_match_autograd(random_field, contract):
    model = random_field
    model.geometry.contract = contract
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.rand(40, 3, generator=g) * (2.0 if contract else 1.0) - (0.5 if contract else 0.0)
        dirs = torch.nn.functional.normalize(torch.randn(8, 3, generator=g), dim=-1)
        rays = torch.randint(0, 8, (40,), generator=g)
        out = field_with_jacobian(model, x, dirs, rays)
        xg, dg = x.clone().requires_grad_(True), dirs.clone().requires_grad_(True)
        geo = model.geometry(xg)
        rgb = model.color(geo.geo_features, dg, rays)
        feats = model.feature(geo.encoding, geo.geo_features)
        assert torch.allclose(out.density, geo.density) and torch.allclose(out.rgb, rgb) and torch.allclose(out.features, feats)
        grad, = torch.autograd.grad(geo.density.sum(), xg, retain_graph=True)
        assert torch.allclose(out.d_density, grad, rtol=1e-4, atol=1e-5)
        for c in range(feats.shape[1]):
            grad, = torch.autograd.grad(feats[:, c].sum(), xg, retain_graph=True)
            assert torch.allclose(out.d_features[:, :, c], grad, rtol=1e-4, atol=1e-5)
        for c in range(3):
            gx, gd = torch.autograd.grad(rgb[:, c].sum(), (xg, dg), retain_graph=True)
            assert torch.allclose(out.d_rgb[:, :3, c], gx, rtol=1e-4, atol=1e-6)
            per_ray = torch.zeros(8, 3).index_add_(0, rays, out.d_rgb[:, 3:, c])  # a ray's samples share its direction
            assert torch.allclose(per_ray, gd, rtol=1e-4, atol=1e-6)
    finally:
        model.geometry.contract = False


@pytest.mark.parametrize("band", [8, 0])
def test_forward_and_reverse_pose_jacobians_agree(random_field, band):
    """In a surface band and at a full march's (padded) samples, with a pixel set per query."""
    model = random_field
    K, c2w = _cameras()
    grid = pixel_grid(48, 64, 8).reshape(-1, 2)
    pixels = torch.stack([grid, grid.flip(0) + 1.5])
    rows = torch.arange(2)
    samples = RaySampler(model, K, pixels, band).samples(rows, c2w)
    fwd = render_samples(model, K, c2w, pixels, samples)
    rev = render_samples_reverse(model, K, c2w, pixels, samples)
    for key in ("rgb", "features", "opacity", "depth", "d_rgb", "d_features"):
        a, b = getattr(fwd, key), getattr(rev, key)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max()))), key
    assert float(fwd.d_features.abs().max()) > 0.1 and float(fwd.opacity.max()) > 0.3  # not vacuous


def _tiny_views(tiny_scene, n=2):
    images, K, gt = query_views(tiny_scene, n)
    return images, torch.tensor(K, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)


def test_surface_band_renders_as_the_full_march(tiny_run, tiny_scene):
    """On a trained field, 8 samples around the surface the first march found give the full
    march's colours and features, at that pose and after a small move (no re-march)."""
    _, model = tiny_run
    _, K, gt = _tiny_views(tiny_scene)
    stride = 4
    grid = pixel_grid(48, 64, stride).reshape(-1, 2)
    rows = torch.arange(2)
    with frozen(model.eval()), torch.no_grad():
        sampler = RaySampler(model, K, grid, 8)
        for pose in (gt, gt @ se3_exp(torch.tensor([[0.004, -0.003, 0.002, 0.004, 0.002, -0.003]] * 2))):
            band = render_samples(model, K, pose, grid, sampler.samples(rows, pose), jacobian=False)
            full = render_image(model, K, pose, 48, 64, stride, fused=False)
            assert sampler.marches == 2  # the first render marched; the move stayed within the band
            assert (band.rgb - full["rgb"].reshape(2, -1, 3)).abs().mean() < 0.01
            assert (band.rgb - full["rgb"].reshape(2, -1, 3)).abs().max() < 0.15
            f_full = full["features"].reshape(2, -1, band.features.shape[-1])
            cos = torch.nn.functional.cosine_similarity(band.features, f_full, dim=-1, eps=1e-6)
            assert cos.mean() > 0.98, cos.mean()  # room for the tiny field's training numerics (0.987-0.99)


@pytest.mark.parametrize("fused,kind", [(True, "cosine"), (False, "cosine"), (True, "robust")])
def test_feature_gauss_newton_gradient_is_the_loss_gradient(tiny_run, tiny_scene, fused, kind):
    """J^T r of the feature phase's Gauss-Newton system is the autograd gradient of the
    feature-metric loss (cosine: exactly its gradient; robust: IRLS's reweighted one)."""
    _, model = tiny_run
    images, K, gt = _tiny_views(tiny_scene)
    init = torch.tensor(perturb_poses(gt.double().numpy(), 2.0, 0.03, seed=2), dtype=torch.float32)
    stride = model.feature_stride
    h, w = 48 // stride, 64 // stride
    grid = pixel_grid(48, 64, stride).reshape(-1, 2)
    rows = torch.arange(2)
    with frozen(model.eval()):
        query = model.encode_images(torch.as_tensor(images)).detach()[..., :h, :w]
        samples = RaySampler(model, K, grid, 8).samples(rows, init)
        out = render_samples(model, K, init, grid, samples)
        if fused:
            feats, J = fused_with_jacobian(model, out.rgb, out.d_rgb, out.features, out.d_features, h, w)
        else:
            feats, J = out.features, out.d_features
        loss, JtJ, Jtr = feature_equations(feats, J, query.flatten(2).transpose(1, 2), kind)
        eps = torch.zeros(2, 6, requires_grad=True)
        with torch.enable_grad():
            values = _render_values(model, K, init, grid, samples, True, eps[:, None].expand(2, grid.shape[0], 6))
            maps = values.features.transpose(1, 2).reshape(2, -1, h, w)
            if fused:
                maps = model.fusion(values.rgb.transpose(1, 2).reshape(2, 3, h, w), maps)
            ref = feature_metric_loss(maps, query, kind)
            grad, = torch.autograd.grad(ref.sum(), eps)
    assert torch.allclose(loss, ref.detach(), atol=1e-5)
    assert torch.allclose(Jtr, grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max())), (Jtr, grad)
    assert torch.all(torch.linalg.eigvalsh(JtJ) > -1e-6)  # J^T J: symmetric positive semi-definite
