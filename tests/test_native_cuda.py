"""CUDA launchers of the native kernel bodies vs the pure-torch twins on the GPU (and vs the CPU
launchers of the same bodies). Skipped without a CUDA device; benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import pytest
import torch

from fastnefes.ops import OccupancyGrid, _backend, backends
from fastnefes.ops._native import composite_native, hash_grid_encode_native
from fastnefes.ops.composite._torch_impl import composite_torch
from fastnefes.ops.hashgrid._torch_impl import hash_grid_encode_torch
from fastnefes.ops.hashgrid.config import HashGridConfig
from fastnefes.ops.occgrid._native import march_rays_native
from fastnefes.ops.occgrid._torch_impl import march_rays


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _backend._unavailable("cuda")


pytestmark = pytest.mark.skipif(_cuda_reason() is not None, reason=f"native CUDA kernels: {_cuda_reason()}")

SMALL = HashGridConfig(n_levels=6, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.8)


@pytest.fixture(scope="module", autouse=True)
def cuda_module():
    module = _backend.load_native("cuda")
    assert module is not None and module.with_cuda, _backend.native_status()
    return module


def _points(n: int, seed: int, device="cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g)
    edges = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.25, 0.5, 0.75], [-0.02, 0.5, 1.03], [1.1, -0.1, 0.3]])
    return torch.cat([x, edges]).to(device)


def _encode(fn, x, params, cfg, seed=1):
    xx, pp = x.clone().requires_grad_(), params.clone().requires_grad_()
    out = fn(xx, pp, cfg)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    gx, gp = torch.autograd.grad((out * w).sum(), [xx, pp])
    return out.detach(), gx, gp


@pytest.mark.parametrize("cfg", [SMALL, HashGridConfig(), HashGridConfig(n_levels=4, n_features_per_level=8,
                                                                            log2_hashmap_size=12)])
def test_hashgrid_cuda_matches_torch_float32(cfg: HashGridConfig) -> None:
    x = _points(20000, 0)
    params = (torch.rand(cfg.n_params, generator=torch.Generator().manual_seed(2)) * 2 - 1).cuda()
    got = _encode(hash_grid_encode_native, x, params, cfg)
    ref = _encode(hash_grid_encode_torch, x, params, cfg)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5 * max(1.0, float(b.abs().max())), rtol=1e-4)


def test_hashgrid_cuda_matches_cpu_launcher() -> None:
    """The same kernel body through both launchers (float64: no atomics-order noise to speak of)."""
    x = _points(3000, 3).double()
    params = (torch.rand(SMALL.n_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1)
    got = _encode(hash_grid_encode_native, x, params.cuda(), SMALL)
    cpu = _encode(hash_grid_encode_native, x.cpu(), params, SMALL)
    for a, b in zip(got, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=1e-10)


def test_hashgrid_cuda_half_inputs() -> None:
    """Half positions and table (tcnn's precision): output half, gradients in the inputs' dtypes."""
    x = _points(5000, 5)
    params = (torch.rand(SMALL.n_params, generator=torch.Generator().manual_seed(6)) * 2 - 1).cuda()
    xh, ph = x.half().requires_grad_(), params.half().requires_grad_()
    out = hash_grid_encode_native(xh, ph, SMALL)
    assert out.dtype == torch.float16
    gx, gp = torch.autograd.grad(out.float().sum(), [xh, ph])
    assert gx.dtype == torch.float16 and gp.dtype == torch.float16
    ref = hash_grid_encode_torch(xh.float(), ph.float(), SMALL)
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=1e-2)
    xf = x.requires_grad_()
    mixed = hash_grid_encode_native(xf, params.half(), SMALL)  # float positions, half table
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, hash_grid_encode_torch(x.detach(), params.half().float(), SMALL), atol=1e-5, rtol=1e-4)


def test_hashgrid_cuda_gradcheck_float64() -> None:
    cfg = HashGridConfig(n_levels=3, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0)
    x = torch.tensor([[0.13, 0.52, 0.71], [0.62, 0.27, 0.44], [0.91, 0.83, 0.08]], dtype=torch.float64, device="cuda")
    params = (torch.rand(cfg.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).cuda()
    assert torch.autograd.gradcheck(lambda a, b: hash_grid_encode_native(a, b, cfg),
                                    (x.requires_grad_(), params.requires_grad_()), eps=1e-6, atol=1e-8)


def test_hashgrid_backend_without_tinycudann(monkeypatch) -> None:
    from fastnefes.ops.hashgrid import _tcnn

    monkeypatch.setattr(backends, "_probe_cache", {})
    monkeypatch.setattr(_tcnn, "_IMPORT_ERROR", "tinycudann not importable (test)")
    monkeypatch.delenv("FASTNEFES_BACKEND", raising=False)
    monkeypatch.delenv("FASTNEFES_HASHGRID_BACKEND", raising=False)
    assert backends.resolve("hashgrid", "cuda") == "native"
    assert {r["op"]: r["backend"] for r in backends.report("cuda")}["hashgrid"] == "native"
    backends.forget_probes()


def _packed(counts: list[int], d: int, seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    ri = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = ri.numel()
    step = torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.01
    first = (torch.cumsum(torch.tensor([0] + counts[:-1]), 0))[ri]
    ends = torch.cumsum(step, 0)
    t_ends = ends - (ends[first] - step[first])
    t_starts = t_ends - step
    batch = {"sigmas": torch.rand(n, generator=g, dtype=torch.float64) * 8, "rgbs": torch.rand(n, 3, generator=g, dtype=torch.float64),
             "features": torch.randn(n, d, generator=g, dtype=torch.float64), "t_starts": t_starts, "t_ends": t_ends}
    return {k: v.to(dtype).cuda() for k, v in batch.items()} | {"ray_indices": ri.cuda(), "n_rays": len(counts)}


def _composite(fn, b: dict, detach: bool):
    leaves = {k: b[k].clone().requires_grad_() for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends")}
    out = fn(*leaves.values(), b["ray_indices"], b["n_rays"], detach_feature_weights=detach)
    outs = [out.rgb, out.features, out.depth, out.opacity]
    g = torch.Generator().manual_seed(9)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, list(leaves.values())))


@pytest.mark.parametrize("d", [3, 16, 32, 128, 300])
@pytest.mark.parametrize("detach", [True, False])
def test_composite_cuda_matches_torch(d: int, detach: bool) -> None:
    counts = torch.randint(0, 60, (300,), generator=torch.Generator().manual_seed(d)).tolist()
    b = _packed(counts, d, seed=d)
    for a, r in zip(_composite(composite_native, b, detach), _composite(composite_torch, b, detach)):
        torch.testing.assert_close(a, r, atol=5e-5, rtol=1e-4)


def test_composite_cuda_half_and_gradcheck() -> None:
    b = _packed([5, 0, 9, 1, 30], 40, seed=1)
    half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
    out = composite_native(*(half[k] for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends")),
                           b["ray_indices"], b["n_rays"])
    ref = composite_torch(*(half[k].float() for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends")),
                          b["ray_indices"], b["n_rays"])
    assert out.rgb.dtype == torch.float16
    torch.testing.assert_close(out.features.float(), ref.features, atol=2e-2, rtol=2e-2)
    b64 = _packed([3, 0, 4, 2], 3, seed=2, dtype=torch.float64)
    inputs = tuple(b64[k].clone().requires_grad_() for k in ("sigmas", "rgbs", "features", "t_starts", "t_ends"))

    def fn(*args):
        o = composite_native(*args, b64["ray_indices"], b64["n_rays"], detach_feature_weights=False,
                             transmittance_threshold=0.0)
        return o.rgb, o.features, o.depth, o.opacity

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _grid(res: int, levels: int, p: float, seed: int) -> OccupancyGrid:
    grid = OccupancyGrid(aabb=(-1.0, -0.5, 0.0, 1.0, 1.5, 1.0), resolution=res, levels=levels)
    grid.binaries.copy_(torch.rand(grid.binaries.shape, generator=torch.Generator().manual_seed(seed)) < p)
    return grid.cuda()


def _rays(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor([0.0, 0.5, 0.5])
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 4 + c
    d = torch.nn.functional.normalize(c + (torch.rand(n, 3, generator=g) - 0.5) - o, dim=-1)
    return o.cuda(), d.cuda()


@pytest.mark.parametrize("levels,cone", [(1, 0.0), (3, 0.0), (2, 0.02)])
def test_march_cuda_matches_twin_and_cpu(levels: int, cone: float) -> None:
    grid = _grid(32, levels, 0.05, seed=levels)
    o, d = _rays(2000, seed=1)
    near, far = torch.zeros(2000, device="cuda"), torch.full((2000,), 1e10, device="cuda")
    got = march_rays_native(o, d, grid.binaries, grid.aabbs, near, far, 0.01, cone)
    ref = march_rays(o, d, grid.binaries, grid.aabbs, near, far, 0.01, cone)
    cpu = march_rays_native(o.cpu(), d.cpu(), grid.binaries.cpu(), grid.aabbs.cpu(), near.cpu(), far.cpu(), 0.01, cone)
    assert ref[0].numel() > 1000
    assert torch.equal(got[0], ref[0]) and torch.equal(got[0].cpu(), cpu[0])
    for a, r, c in zip(got[1:], ref[1:], cpu[1:]):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.cpu(), c, atol=1e-6, rtol=0)


def test_march_cuda_through_sampling(monkeypatch) -> None:
    grid = _grid(24, 2, 0.1, seed=5)
    o, d = _rays(1000, seed=6)
    outs = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", backend)
        assert grid.backend == backend
        torch.manual_seed(0)
        outs[backend] = grid.sampling(o, d, near_plane=0.5, render_step_size=0.02, stratified=True)
    assert torch.equal(outs["native"][0], outs["torch"][0])
    torch.testing.assert_close(outs["native"][1], outs["torch"][1], atol=1e-6, rtol=0)
