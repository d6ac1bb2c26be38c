"""Compositing of packed samples vs a dense per-ray loop."""

from __future__ import annotations

import pytest
import torch

from fastnefes.ops import CompositeOutput, composite
from fastnefes.ops.composite import backend_for, composite_torch


def reference_composite(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays, detach_feature_weights=True,
                        transmittance_threshold=1e-4):
    """Front-to-back loop per ray: T *= exp(-sigma dt) after each sample."""
    rgb, feats, depth, opacity = [], [], [], []
    d = features.shape[1] if features is not None else 0
    for r in range(n_rays):
        idx = (ray_indices == r).nonzero()[:, 0].tolist()
        t = torch.ones((), dtype=sigmas.dtype)
        acc_rgb = torch.zeros(3, dtype=sigmas.dtype)
        acc_f = torch.zeros(d, dtype=sigmas.dtype)
        acc_d = torch.zeros((), dtype=sigmas.dtype)
        acc_o = torch.zeros((), dtype=sigmas.dtype)
        for j in idx:
            tau = sigmas[j] * (t_ends[j] - t_starts[j])
            if t.item() >= transmittance_threshold:
                w = t * (1 - torch.exp(-tau))
                acc_rgb = acc_rgb + w * rgbs[j]
                if features is not None:
                    acc_f = acc_f + (w.detach() if detach_feature_weights else w) * features[j]
                acc_d = acc_d + w * (t_starts[j] + t_ends[j]) / 2
                acc_o = acc_o + w
            t = t * torch.exp(-tau)
        rgb.append(acc_rgb), feats.append(acc_f), depth.append(acc_d), opacity.append(acc_o)
    return CompositeOutput(torch.stack(rgb), torch.stack(feats) if features is not None else None,
                           torch.stack(depth), torch.stack(opacity))


def packed_batch(n_rays=7, max_samples=9, d=5, seed=0, dtype=torch.float64, density_scale=3.0):
    """Random packed samples; ray 2 has no samples, ray 4 exactly one."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(2, max_samples + 1, (n_rays,), generator=g)
    counts[2], counts[4] = 0, 1
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = ray_indices.numel()
    dt = torch.rand(n, generator=g, dtype=dtype) * 0.2 + 0.05
    starts = []
    for r in range(n_rays):
        seg = dt[ray_indices == r]
        starts.append(1.0 + torch.cumsum(seg, 0) - seg)
    t_starts = torch.cat(starts)
    t_ends = t_starts + dt
    sigmas = torch.rand(n, generator=g, dtype=dtype) * density_scale
    rgbs = torch.rand(n, 3, generator=g, dtype=dtype)
    feats = torch.randn(n, d, generator=g, dtype=dtype)
    return sigmas, rgbs, feats, t_starts, t_ends, ray_indices, n_rays


def _close(a: CompositeOutput, b: CompositeOutput, atol=1e-10):
    for name in ("rgb", "depth", "opacity", "features"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.allclose(x, y, atol=atol), (name, (x - y).abs().max())


@pytest.mark.parametrize("threshold", [1e-4, 0.0, 0.3])
@pytest.mark.parametrize("detach", [True, False])
def test_values_and_gradients_match_loop(threshold, detach):
    batch = packed_batch(seed=1, density_scale=6.0)
    leaves = [t.clone().requires_grad_(True) for t in batch[:5]]
    ref_leaves = [t.clone().requires_grad_(True) for t in batch[:5]]
    out = composite_torch(*leaves, batch[5], batch[6], detach_feature_weights=detach, transmittance_threshold=threshold)
    ref = reference_composite(*ref_leaves, batch[5], batch[6], detach_feature_weights=detach,
                              transmittance_threshold=threshold)
    _close(out, ref)
    g = torch.Generator().manual_seed(2)
    up = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in (out.rgb, out.features, out.depth, out.opacity)]

    def loss(o):
        return sum((a * b).sum() for a, b in zip((o.rgb, o.features, o.depth, o.opacity), up))

    grads = torch.autograd.grad(loss(out), leaves)
    ref_grads = torch.autograd.grad(loss(ref), ref_leaves)
    for name, a, b in zip(("sigmas", "rgbs", "features", "t_starts", "t_ends"), grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-9), (name, (a - b).abs().max())


def test_zero_sample_rays_and_single_sample():
    sigmas, rgbs, feats, ts, te, ri, n_rays = packed_batch(seed=3)
    out = composite_torch(sigmas, rgbs, feats, ts, te, ri, n_rays + 2)  # two more rays, no samples
    for t in (out.rgb, out.features, out.depth, out.opacity):
        assert t.shape[0] == n_rays + 2
        assert (t[2] == 0).all() and (t[-2:] == 0).all()
    j = (ri == 4).nonzero()[0, 0]
    alpha = 1 - torch.exp(-sigmas[j] * (te[j] - ts[j]))  # single sample: weight = alpha
    assert torch.allclose(out.opacity[4], alpha) and torch.allclose(out.rgb[4], alpha * rgbs[j])
    assert torch.allclose(out.depth[4], alpha * (ts[j] + te[j]) / 2)
    empty = composite_torch(sigmas[:0], rgbs[:0], feats[:0], ts[:0], te[:0], ri[:0], 3)
    assert empty.rgb.shape == (3, 3) and (empty.opacity == 0).all() and empty.features.shape == (3, 5)


def test_zero_and_saturated_density():
    sigmas, rgbs, feats, ts, te, ri, n_rays = packed_batch(seed=4)
    zero = composite_torch(torch.zeros_like(sigmas), rgbs, feats, ts, te, ri, n_rays)
    assert zero.opacity.abs().max() == 0 and zero.rgb.abs().max() == 0 and zero.depth.abs().max() == 0
    sat = composite_torch(torch.full_like(sigmas, 1e4), rgbs, feats, ts, te, ri, n_rays)
    first = torch.stack([(ri == r).nonzero()[0, 0] if (ri == r).any() else torch.tensor(0) for r in range(n_rays)])
    hit = torch.bincount(ri, minlength=n_rays) > 0
    assert torch.allclose(sat.opacity[hit], torch.ones(int(hit.sum()), dtype=sigmas.dtype))
    assert torch.allclose(sat.rgb[hit], rgbs[first[hit]])  # the first sample takes all the weight
    assert torch.allclose(sat.depth[hit], ((ts + te) / 2)[first[hit]])


def test_early_termination_drops_samples_behind_opaque_surface():
    # one ray: sample 0 has T=1, sample 1 T=exp(-5)~6.7e-3, sample 2 T=exp(-10)~4.5e-5
    s = torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    te = ts + 1.0
    rgbs = torch.eye(3, dtype=torch.float64)
    ri = torch.zeros(3, dtype=torch.long)
    on = composite_torch(s, rgbs, None, ts, te, ri, 1, transmittance_threshold=1e-3)
    off = composite_torch(s, rgbs, None, ts, te, ri, 1, transmittance_threshold=0.0)
    alpha = 1 - torch.exp(torch.tensor(-5.0, dtype=torch.float64))
    expected = torch.stack([alpha, alpha * torch.exp(torch.tensor(-5.0, dtype=torch.float64)), torch.tensor(0.0, dtype=torch.float64)])
    assert torch.allclose(on.rgb[0], expected)  # third sample (T < 1e-3) skipped
    assert off.rgb[0, 2] > 0 and torch.allclose(off.rgb[0, :2], expected[:2])
    assert on.features is None


def test_detached_feature_weights_leave_geometry_alone():
    sigmas, rgbs, feats, ts, te, ri, n_rays = packed_batch(seed=5)
    s = sigmas.clone().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    out = composite_torch(s, rgbs, f, ts, te, ri, n_rays, detach_feature_weights=True)
    gs, gf = torch.autograd.grad(out.features.square().sum(), (s, f), allow_unused=True)
    assert gs is None or gs.abs().max() == 0
    assert gf.abs().max() > 0
    out = composite_torch(s, rgbs, f, ts, te, ri, n_rays, detach_feature_weights=False)
    gs = torch.autograd.grad(out.features.square().sum(), s)[0]
    assert gs.abs().max() > 0


def test_gradcheck():
    sigmas, rgbs, feats, ts, te, ri, n_rays = packed_batch(n_rays=5, max_samples=4, d=2, seed=6)
    inputs = tuple(t.clone().requires_grad_(True) for t in (sigmas, rgbs, feats, ts, te))

    def fn(*a):
        o = composite_torch(*a, ri, n_rays, detach_feature_weights=False, transmittance_threshold=0.0)
        return o.rgb, o.features, o.depth, o.opacity

    assert torch.autograd.gradcheck(fn, inputs)


def test_float32_long_batch_keeps_per_ray_precision():
    # many saturated rays before the one checked: a float32 global cumsum would lose its T.
    n_rays, per_ray = 2000, 64
    ri = torch.repeat_interleave(torch.arange(n_rays), per_ray)
    ts = torch.arange(per_ray, dtype=torch.float32).repeat(n_rays) * 0.01
    te = ts + 0.01
    sigmas = torch.full((ri.numel(),), 200.0)
    sigmas[ri == n_rays - 1] = 5.0
    out = composite_torch(sigmas, torch.ones(ri.numel(), 3), None, ts, te, ri, n_rays)
    expected = 1 - torch.exp(torch.tensor(-5.0 * 0.01 * per_ray, dtype=torch.float64))
    assert abs(out.opacity[-1].item() - expected.item()) < 1e-5


def test_bad_inputs():
    sigmas, rgbs, feats, ts, te, ri, n_rays = packed_batch(seed=7)
    with pytest.raises(ValueError, match="sorted"):
        composite_torch(sigmas, rgbs, feats, ts, te, ri.flip(0), n_rays)
    with pytest.raises(ValueError, match="rgbs"):
        composite_torch(sigmas, rgbs[:, :2], feats, ts, te, ri, n_rays)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        composite_torch(sigmas, rgbs, feats, ts, te, ri, 3)


def test_dispatched_backend_matches_torch():
    """composite() on CPU (native when built) equals the torch twin, values and gradients."""
    batch = packed_batch(n_rays=50, max_samples=30, d=16, seed=8, dtype=torch.float32)
    a = [t.clone().requires_grad_(True) for t in batch[:5]]
    b = [t.clone().requires_grad_(True) for t in batch[:5]]
    out = composite(*a, batch[5], batch[6], detach_feature_weights=False)
    ref = composite_torch(*b, batch[5], batch[6], detach_feature_weights=False)
    _close(out, ref, atol=1e-5)
    la = sum(t.sum() for t in (out.rgb, out.features, out.depth, out.opacity))
    lb = sum(t.sum() for t in (ref.rgb, ref.features, ref.depth, ref.opacity))
    for x, y in zip(torch.autograd.grad(la, a[:3]), torch.autograd.grad(lb, b[:3])):
        assert torch.allclose(x, y, atol=1e-4), backend_for("cpu")
