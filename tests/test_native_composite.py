"""Native fused compositing (csrc/) vs its pure-torch twin: values, gradients, edge cases, build."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastnefes.ops import _backend, backends
from fastnefes.ops._native import composite_native
from fastnefes.ops.composite._torch_impl import composite_torch

_NOT_BUILDABLE = _backend._precondition_reason()
needs_native = pytest.mark.skipif(_NOT_BUILDABLE is not None, reason=f"native kernels cannot be built: {_NOT_BUILDABLE}")


@pytest.fixture(scope="module")
def native():
    """The CPU module; a build failure where a compiler exists is a test failure, not a skip."""
    module = _backend.load_native("cpu")
    assert module is not None, _backend.native_status()
    return module


def packed(counts: list[int], d: int | None, seed: int = 0, dtype=torch.float32, density: float = 4.0,
           sigma_fill: float | None = None) -> dict:
    """Samples of len(counts) rays packed in order; ray r has counts[r] samples over t in [0, 2]."""
    g = torch.Generator().manual_seed(seed)
    ray_indices = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    n = int(ray_indices.numel())
    steps = torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 0.01
    first = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)[ray_indices]  # first sample of each one's ray
    ends = torch.cumsum(steps, 0)
    t_ends = ends - (ends[first] - steps[first])  # t restarts at each ray
    t_starts = t_ends - steps * torch.empty(n, dtype=torch.float64).uniform_(0.5, 1.0, generator=g)  # small gaps
    sigmas = torch.rand(n, generator=g, dtype=torch.float64) * density if sigma_fill is None \
        else torch.full((n,), sigma_fill, dtype=torch.float64)
    out = {"sigmas": sigmas, "rgbs": torch.rand(n, 3, generator=g, dtype=torch.float64),
           "features": None if d is None else torch.randn(n, d, generator=g, dtype=torch.float64),
           "t_starts": t_starts, "t_ends": t_ends}
    out = {k: None if v is None else v.to(dtype) for k, v in out.items()}
    return out | {"ray_indices": ray_indices, "n_rays": len(counts)}


def run_both(batch: dict, detach: bool = True, threshold: float = 1e-4, grad_t: bool = True, seed: int = 1):
    """Forward + backward of a random linear loss through native and torch; returns both results."""
    names = ["sigmas", "rgbs", "features"] + (["t_starts", "t_ends"] if grad_t else [])
    results = []
    for fn in (composite_native, composite_torch):
        leaves = {k: batch[k].clone().requires_grad_(k in names) if batch[k] is not None else None
                  for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends")}
        out = fn(leaves["sigmas"], leaves["rgbs"], leaves["features"], leaves["t_starts"], leaves["t_ends"],
                 batch["ray_indices"], batch["n_rays"], detach_feature_weights=detach,
                 transmittance_threshold=threshold)
        outs = [o for o in (out.rgb, out.features, out.depth, out.opacity) if o is not None]
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        wrt = [leaves[k] for k in names if leaves[k] is not None]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and loss.requires_grad else []
        results.append((outs, [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, grads)]))
    return results


def assert_close_results(results, atol=2e-5, rtol=1e-4) -> None:
    (outs_n, grads_n), (outs_t, grads_t) = results
    assert len(outs_n) == len(outs_t) and len(grads_n) == len(grads_t)
    for a, b in zip(outs_n + grads_n, outs_t + grads_t):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@needs_native
@pytest.mark.parametrize("d", [1, 3, 16, 32, 77, 128, 256, 300])
@pytest.mark.parametrize("detach", [True, False])
def test_matches_torch_twin_random(native, d: int, detach: bool) -> None:
    counts = torch.randint(0, 40, (60,), generator=torch.Generator().manual_seed(d)).tolist()
    batch = packed(counts, d, seed=d)
    assert_close_results(run_both(batch, detach=detach))


@needs_native
def test_random_feature_width_and_float64(native) -> None:
    g = torch.Generator().manual_seed(123)
    d = int(torch.randint(1, 257, (1,), generator=g))
    counts = torch.randint(0, 30, (25,), generator=g).tolist()
    batch = packed(counts, d, seed=5, dtype=torch.float64)
    assert_close_results(run_both(batch, detach=False), atol=1e-10, rtol=1e-9)


@needs_native
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 1e-2])
def test_gradcheck_float64(native, detach: bool, threshold: float) -> None:
    batch = packed([3, 0, 1, 4, 2], 3, seed=7, dtype=torch.float64, density=6.0)
    inputs = tuple(batch[k].clone().requires_grad_() for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends"))
    rays = (batch["ray_indices"], batch["n_rays"])

    def fn(*args):
        out = composite_native(*args, *rays, detach_feature_weights=detach, transmittance_threshold=threshold)
        # Detached feature weights make d features / d (sigma, t) zero by design, unlike finite differences.
        return (out.rgb, out.depth, out.opacity) + (() if detach else (out.features,))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    if detach:
        sigmas, rgbs, _, t_starts, t_ends = (t.detach() for t in inputs)

        def features_only(features):
            return composite_native(sigmas, rgbs, features, t_starts, t_ends, *rays,
                                    transmittance_threshold=threshold).features

        assert torch.autograd.gradcheck(features_only, (inputs[2],), eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_native
def test_empty_and_single_sample_rays(native) -> None:
    # Leading, inner and trailing rays without samples; rays with exactly one sample.
    batch = packed([0, 1, 0, 0, 4, 1, 0, 7, 0], 6, seed=3)
    results = run_both(batch, detach=False)
    assert_close_results(results)
    rgb, feats, depth, opacity = results[0][0]
    empty = torch.tensor([0, 2, 3, 6, 8])
    for o in (rgb, feats, depth, opacity):
        assert torch.all(o[empty] == 0)
    # A single-sample ray: weight = alpha of its only sample.
    j = int((batch["ray_indices"] == 1).nonzero())
    alpha = 1 - torch.exp(-batch["sigmas"][j] * (batch["t_ends"][j] - batch["t_starts"][j]))
    torch.testing.assert_close(opacity[1], alpha)


@needs_native
def test_no_samples_at_all(native) -> None:
    batch = packed([0, 0, 0], 5)
    out = composite_native(batch["sigmas"], batch["rgbs"], batch["features"], batch["t_starts"], batch["t_ends"],
                           batch["ray_indices"], 3)
    assert out.rgb.shape == (3, 3) and out.features.shape == (3, 5)
    assert all(torch.all(o == 0) for o in (out.rgb, out.features, out.depth, out.opacity))


@needs_native
def test_zero_density(native) -> None:
    batch = packed([5, 3, 8], 4, sigma_fill=0.0)
    results = run_both(batch, detach=False)
    assert_close_results(results)
    outs, grads = results[0]
    assert all(torch.all(o == 0) for o in outs)
    assert grads[0].abs().sum() > 0  # d/dsigma at sigma = 0 is not zero: density would add colour


@needs_native
def test_saturated_density_terminates_after_first_sample(native) -> None:
    batch = packed([5, 3, 8], 4, sigma_fill=1e4)
    results = run_both(batch, detach=False)
    assert_close_results(results)
    (rgb, feats, depth, opacity), grads = results[0]
    torch.testing.assert_close(opacity, torch.ones(3))
    firsts = torch.tensor([0, 5, 8])
    torch.testing.assert_close(rgb, batch["rgbs"][firsts])
    later = torch.ones(16, dtype=torch.bool)
    later[firsts] = False
    for gr in grads:  # samples behind the first see T ~ 0 < threshold: no gradient at all
        assert torch.all(gr[later] == 0)


@needs_native
@pytest.mark.parametrize("threshold", [0.0, 1e-4, 0.05, 0.5])
def test_early_termination_matches_twin(native, threshold: float) -> None:
    batch = packed([30, 12, 45, 1, 20], 8, seed=11, density=20.0)
    results = run_both(batch, detach=False, threshold=threshold)
    assert_close_results(results)
    if threshold > 0:  # the dense ray 2 (samples 42..86) stops early: its tail gets no gradient
        assert all(torch.all(g[67:87] == 0) for g in results[0][1])


@needs_native
def test_detached_feature_weights_do_not_reach_sigma(native) -> None:
    batch = packed([10, 6], 5, seed=2)
    sig = batch["sigmas"].clone().requires_grad_()
    out = composite_native(sig, batch["rgbs"], batch["features"], batch["t_starts"], batch["t_ends"],
                           batch["ray_indices"], 2, detach_feature_weights=True)
    (g,) = torch.autograd.grad(out.features.sum(), [sig])
    assert torch.all(g == 0)


@needs_native
def test_features_none_and_partial_output_use(native) -> None:
    batch = packed([4, 0, 6], None, seed=4)
    assert_close_results(run_both(batch))
    # Only opacity used: the other upstream gradients are absent (None) inside the backward.
    sig = batch["sigmas"].clone().requires_grad_()
    args = (batch["rgbs"], None, batch["t_starts"], batch["t_ends"], batch["ray_indices"], 3)
    (g_n,) = torch.autograd.grad(composite_native(sig, *args).opacity.sum(), [sig])
    (g_t,) = torch.autograd.grad(composite_torch(sig, *args).opacity.sum(), [sig])
    torch.testing.assert_close(g_n, g_t)


@needs_native
def test_rejects_bad_inputs(native) -> None:
    batch = packed([3, 3], 2)
    args = [batch[k] for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends", "ray_indices", "n_rays")]
    with pytest.raises(ValueError, match="sorted"):
        composite_native(*args[:5], batch["ray_indices"].flip(0), 2)
    with pytest.raises(ValueError, match=r"ray_indices\[3\] = 1: expected sorted ray indices in \[0, 1\)"):
        composite_native(*args[:6], 1)
    with pytest.raises(ValueError, match="rgbs"):
        composite_native(args[0], torch.rand(6, 4), *args[2:])
    with pytest.raises(ValueError, match="t_ends"):
        composite_native(*args[:4], args[4][:5], *args[5:])
    with pytest.raises(ValueError, match="ray_indices"):
        composite_native(*args[:5], batch["ray_indices"].float(), 2)
    with pytest.raises(ValueError, match="sorted ray indices"):  # the kernel's own guard
        native.ray_ranges(torch.tensor([0, 1, 0]), 2, 0)


@needs_native
def test_backend_resolution(native, monkeypatch) -> None:
    monkeypatch.delenv("FASTNEFES_BACKEND", raising=False)
    monkeypatch.delenv("FASTNEFES_COMPOSITE_BACKEND", raising=False)
    assert backends.resolve("composite", "cpu") == "native"
    monkeypatch.setenv("FASTNEFES_BACKEND", "torch")
    assert backends.resolve("composite", "cpu") == "torch"
    monkeypatch.setenv("FASTNEFES_BACKEND", "auto")
    monkeypatch.setenv("FASTNEFES_COMPOSITE_BACKEND", "torch")
    assert backends.resolve("composite", "cpu") == "torch"


def test_build_failure_falls_back_with_one_warning(monkeypatch) -> None:
    """A broken build: load_native gives None once, warns once naming the reason; ops use torch."""
    monkeypatch.setattr(_backend, "_modules", {})
    monkeypatch.setattr(_backend, "_errors", {})
    monkeypatch.setattr(_backend, "_by_device", {})
    monkeypatch.setattr(_backend, "_precondition_reason", lambda: None)
    monkeypatch.setattr(_backend, "_cuda_build_reason", lambda: "no CUDA device visible")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_probe_cache", {}, raising=False)  # probes are cached per process
    calls = []

    def broken_build(kind, verbose):
        calls.append(kind)
        raise RuntimeError("Error building extension 'x': [1/2] c++ ...\nbindings.cpp:3:10: error: boom.h: No such file")

    monkeypatch.setattr(_backend, "_build", broken_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.load_native("cpu") is None
        assert _backend.load_native("cpu") is None
        batch = packed([3, 2], 4)
        out = composite_native(batch["sigmas"], batch["rgbs"], batch["features"], batch["t_starts"],
                               batch["t_ends"], batch["ray_indices"], 2)
    assert calls == ["cpu"]  # remembered, not retried
    messages = [str(w.message) for w in caught if "native kernels unavailable" in str(w.message)]
    assert len(messages) == 1 and "error: boom.h" in messages[0]
    ref = composite_torch(batch["sigmas"], batch["rgbs"], batch["features"], batch["t_starts"], batch["t_ends"],
                          batch["ray_indices"], 2)
    torch.testing.assert_close(out.rgb, ref.rgb, atol=0, rtol=0)
    assert "boom.h" in backends._probe("composite", "native", "cpu")
    assert "failed" in _backend.native_status()["fastnefes_native_cpu"]
