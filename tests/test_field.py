"""Feature field parts and rendering: shapes, gradients, ACT identity, world-unit depth, pose gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastnefes.data.normalize import SceneNormalization
from fastnefes.field.act import ExposureACT, luma_histogram
from fastnefes.field.fusion import FeatureFusion
from fastnefes.field.geometry import GeometryOutput, trunc_exp
from fastnefes.field.heads import spherical_harmonics
from fastnefes.field.model import FeatureFieldModel, ModelConfig
from fastnefes.render import render_image, render_pixels, render_rays

SMALL_GRID = {"n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5}


def small_model(normalization: SceneNormalization | None = None, **overrides) -> FeatureFieldModel:
    torch.manual_seed(0)
    cfg = ModelConfig(grid=dict(SMALL_GRID), feature_dim=8, fusion_width=8, occ_resolution=16, march_steps=64,
                      n_images=3, **overrides)
    norm = normalization or SceneNormalization(center=np.zeros(3), scale=0.25, near=0.05, far=10.0)
    return FeatureFieldModel(cfg, norm)


def fibonacci_sphere(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def test_trunc_exp_value_and_clamped_gradient():
    x = torch.tensor([-2.0, 0.0, 3.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.allclose(y, torch.exp(x.detach()))
    y.sum().backward()
    expected = torch.exp(torch.tensor([-2.0, 0.0, 3.0, 15.0]))
    assert torch.allclose(x.grad, expected)


def test_spherical_harmonics_are_orthonormal_on_the_sphere():
    dirs = fibonacci_sphere(20000)
    Y = spherical_harmonics(dirs, 4)  # [N,16]
    gram = Y.t() @ Y * (4 * math.pi / dirs.shape[0])
    assert torch.allclose(gram, torch.eye(16, dtype=gram.dtype), atol=2e-3)


def test_geometry_and_heads_shapes_and_gradients():
    model = small_model()
    x = torch.rand(50, 3, requires_grad=True)
    geo = model.geometry(x)
    assert isinstance(geo, GeometryOutput)
    assert geo.density.shape == (50,) and bool((geo.density >= 0).all())
    assert geo.geo_features.shape == (50, 15) and geo.encoding.shape == (50, 8)
    dirs = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    rgb = model.color(geo.geo_features, dirs, torch.arange(50) // 10)
    feats = model.feature(geo.encoding, geo.geo_features)
    tr = model.transient(geo.encoding, torch.randint(0, 3, (50,)))
    assert rgb.shape == (50, 3) and bool(((rgb > 0) & (rgb < 1)).all())
    assert feats.shape == (50, 8)
    assert tr.density.shape == (50,) and tr.rgb.shape == (50, 3) and tr.beta.shape == (50,)
    assert float(tr.density.detach().max()) < 0.05  # transients start almost absent
    (geo.density.sum() + rgb.sum() + feats.sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert float(model.geometry.encoding.params.grad.abs().sum()) > 0


def test_luma_histogram_matches_numpy():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    ref = np.bincount(np.minimum((luma * 10).astype(int), 9).ravel(), minlength=10) / luma.size
    assert np.allclose(luma_histogram(img).numpy(), ref, atol=1e-6)
    batched = luma_histogram(np.stack([img, img]))
    assert batched.shape == (2, 10)


def test_act_is_identity_at_init_and_affine_in_logit_space():
    act = ExposureACT()
    rgb = torch.rand(64, 3) * 0.98 + 0.01
    hist = torch.softmax(torch.randn(64, 10), -1)
    assert torch.allclose(act(rgb, hist), rgb, atol=1e-6)
    K = torch.diag(torch.tensor([2.0, 1.0, 0.5])).expand(64, 3, 3)
    b = torch.tensor([0.1, 0.0, -0.2]).expand(64, 3)
    out = ExposureACT.apply_transform(rgb, K, b)
    logit = torch.log(rgb / (1 - rgb))
    assert torch.allclose(out, torch.sigmoid(logit * torch.tensor([2.0, 1.0, 0.5]) + b), atol=1e-6)


def test_fusion_output_shape_and_batchnorm_modes():
    fusion = FeatureFusion(feature_dim=8, width=16)
    rgb, feats = torch.rand(2, 3, 10, 12), torch.randn(2, 8, 10, 12)
    out = fusion(rgb, feats)
    assert out.shape == (2, 8, 10, 12)
    # Training-mode batch norm: per-channel zero mean, unit variance over the batch.
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5)
    fusion.eval()
    assert fusion(rgb[:1], feats[:1]).shape == (1, 8, 10, 12)


def plane_model(plane_z_world: float) -> FeatureFieldModel:
    """A model whose density is a dense slab beyond world z = plane_z_world (everything else empty)."""
    model = small_model()
    model.occupancy.binaries.fill_(True)
    geometry_forward = model.geometry.forward
    norm = model.normalization

    def slab(x):
        out = geometry_forward(x)
        z_world = (x[:, 2] - 0.5) / norm.scale + norm.center[2]
        density = torch.where(z_world > plane_z_world, torch.full_like(z_world, 1e4), torch.zeros_like(z_world))
        return GeometryOutput(density, out.geo_features, out.encoding)

    model.geometry.forward = slab
    return model.eval()


def test_render_rays_depth_is_in_world_units():
    model = plane_model(plane_z_world=1.0)
    origins = torch.tensor([[0.0, 0.0, -1.0], [0.3, -0.2, -0.5]])
    dirs = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.1, 1.0]]), dim=-1)
    with torch.no_grad():
        out = render_rays(model, origins, dirs)
    expected = (1.0 - origins[:, 2]) / dirs[:, 2]  # ray distance to the plane
    step_world = model.render_step_size / model.normalization.scale
    assert torch.allclose(out["depth"], expected, atol=step_world)
    assert torch.allclose(out["opacity"], torch.ones(2), atol=1e-3)
    assert out["features"].shape == (2, 8) and out["rgb"].shape == (2, 3)


def test_render_image_z_depth_shapes_and_stride():
    model = plane_model(plane_z_world=1.0)
    K = torch.tensor([[[20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]]])
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = -1.0  # camera at z = -1 looking along +z
    with torch.no_grad():
        out = render_image(model, K, c2w, height=24, width=32, stride=4)
    assert out["rgb"].shape == (1, 6, 8, 3) and out["fused"].shape == (1, 6, 8, 8)
    assert out["features"].shape == (1, 6, 8, 8) and out["depth"].shape == (1, 6, 8)
    step_world = model.render_step_size / model.normalization.scale
    assert torch.allclose(out["depth"], torch.full((1, 6, 8), 2.0), atol=step_world)  # z-depth, not ray length
    with torch.no_grad():  # colour and geometry alone: the same values without the feature head
        plain = render_image(model, K, c2w, height=24, width=32, stride=4, fused=False, with_features=False)
    assert "features" not in plain and "fused" not in plain
    for key in ("rgb", "depth", "opacity"):
        assert torch.equal(plain[key], out[key]), key
    with pytest.raises(ValueError, match="fused"):
        render_image(model, K, c2w, height=24, width=32, stride=4, fused=True, with_features=False)


def test_render_image_gradients_reach_the_pose_and_match_finite_differences():
    torch.manual_seed(1)
    model = small_model()
    model.occupancy.binaries.fill_(True)
    with torch.no_grad():  # a non-trivial field so features vary in space
        model.geometry.encoding.params.uniform_(-1, 1)
    model.eval()
    K = torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]], dtype=torch.float32)
    base = torch.eye(4)[None].clone()
    base[0, :3, 3] = torch.tensor([0.1, -0.2, -1.5])
    weights = torch.randn(1, 2, 2, 8)

    def objective(c2w):
        out = render_image(model, K, c2w, height=8, width=8, stride=4, fused=True)
        return (out["fused"] * weights).sum() + out["rgb"].sum()

    c2w = base.clone().requires_grad_(True)
    objective(c2w).backward()
    grad = c2w.grad[0, :3, 3]
    assert bool(torch.isfinite(c2w.grad).all()) and float(grad.abs().sum()) > 0
    eps = 1e-3
    for axis in range(2):  # sideways moves keep the marching t grid (near plane) fixed
        shift = torch.zeros(4, 4)
        shift[axis, 3] = eps
        with torch.no_grad():
            fd = (objective(base + shift) - objective(base - shift)) / (2 * eps)
        assert float(fd) == pytest.approx(float(grad[axis]), rel=0.05, abs=1e-3 * (1 + abs(float(fd))))


def test_render_pixels_with_transient_and_act_training_outputs():
    model = small_model()
    model.occupancy.binaries.fill_(True)
    origins = torch.zeros(6, 3)
    dirs = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    hist = torch.full((6, 10), 0.1)
    out = render_rays(model, origins, dirs, image_ids=torch.tensor([0, 1, 2, 0, 1, 2]), act_histograms=hist, training=True)
    assert out["beta"].shape == (6,) and bool((out["beta"] >= model.config.beta_min).all())
    assert out["rgb_train"].shape == (6, 3)
    pixels = torch.rand(1, 3, 3, 2) * 8
    res = render_pixels(model, torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]]), torch.eye(4)[None], pixels)
    assert res["fused"].shape == (1, 3, 3, 8) and res["opacity"].shape == (1, 3, 3)
