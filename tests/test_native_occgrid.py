"""Native occupancy-grid march (csrc/occgrid_kernel.h) vs its pure-torch twin: the same samples,
bit for bit, on random grids and on the edge cases (cell borders, rays along cell faces, rays
missing the grid, empty and full grids, nested levels, cone steps, per-ray limits)."""

from __future__ import annotations

import pytest
import torch

from fastnefes.ops import OccupancyGrid, _backend, backends
from fastnefes.ops.occgrid._native import march_rays_native, occupancy_mips
from fastnefes.ops.occgrid._torch_impl import march_rays

_NOT_BUILDABLE = _backend._precondition_reason()
pytestmark = pytest.mark.skipif(_NOT_BUILDABLE is not None, reason=f"native kernels cannot be built: {_NOT_BUILDABLE}")

AABB = (-1.0, -0.5, 0.0, 1.0, 1.5, 1.0)


@pytest.fixture(scope="module", autouse=True)
def native():
    """The CPU module; a build failure where a compiler exists is a test failure, not a skip."""
    module = _backend.load_native("cpu")
    assert module is not None, _backend.native_status()
    return module


def random_grid(res: int, levels: int, p: float, seed: int, aabb=AABB) -> OccupancyGrid:
    grid = OccupancyGrid(aabb=aabb, resolution=res, levels=levels)
    grid.binaries.copy_(torch.rand(grid.binaries.shape, generator=torch.Generator().manual_seed(seed)) < p)
    return grid


def rays_at(n: int, seed: int, centre=(0.0, 0.5, 0.5), spread: float = 1.0, dist: float = 4.0, dtype=torch.float32):
    """Rays from a sphere of radius `dist` towards random points around `centre`; a few start
    inside the grid and a few point away from it."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centre)
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * dist + c
    d = torch.nn.functional.normalize(c + (torch.rand(n, 3, generator=g) - 0.5) * spread - o, dim=-1)
    o[: n // 10] = c + (torch.rand(n // 10, 3, generator=g) - 0.5) * 0.8  # inside
    d[n // 10: n // 5] = -d[n // 10: n // 5]  # away from the grid
    return o.to(dtype), d.to(dtype)


def march_both(grid: OccupancyGrid, o, d, near, far, step: float, cone: float = 0.0):
    aabbs = grid.aabbs.to(o.dtype)
    ref = march_rays(o, d, grid.binaries, aabbs, near, far, step, cone)
    got = march_rays_native(o, d, grid.binaries, grid.aabbs, near, far, step, cone)
    return got, ref


def assert_same_samples(got, ref, t_atol: float = 0.0) -> None:
    assert got[0].dtype == torch.long and got[1].dtype == ref[1].dtype
    assert torch.equal(got[0], ref[0]), (got[0].numel(), ref[0].numel())
    if t_atol == 0.0:
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    else:  # float64 cone steps: libm's pow vs torch's vectorised pow differ in the last bit
        torch.testing.assert_close(got[1], ref[1], atol=t_atol, rtol=0)
        torch.testing.assert_close(got[2], ref[2], atol=t_atol, rtol=0)


@pytest.mark.parametrize("res,levels,p,cone", [(8, 1, 0.3, 0.0), (16, 2, 0.1, 0.0), (12, 3, 0.08, 0.0),
                                               (32, 2, 0.03, 0.02), (24, 4, 0.02, 0.1), (7, 2, 0.2, 0.0)])
def test_matches_twin_random_grids(res: int, levels: int, p: float, cone: float) -> None:
    grid = random_grid(res, levels, p, seed=res + levels)
    o, d = rays_at(400, seed=res)
    g = torch.Generator().manual_seed(7)
    near = torch.rand(400, generator=g) * 0.5
    far = torch.where(torch.rand(400, generator=g) < 0.3, torch.rand(400, generator=g) * 4 + 2, torch.full((400,), 1e10))
    got, ref = march_both(grid, o, d, near, far, 0.013, cone)
    assert ref[0].numel() > 200
    assert_same_samples(got, ref)


@pytest.mark.parametrize("aabb", [(-0.7, -0.3, 0.1, 0.9, 1.2, 1.0), (-1.0, -0.5, 0.0, 1.0, 1.5, 1.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_twin_boxes_not_powers_of_two(aabb, dtype) -> None:
    """Box extents that are not powers of two (all axes, one axis): the kernel divides there, as
    the twin does; where they are, it multiplies by the exact reciprocal."""
    grid = random_grid(20, 3, 0.06, seed=21, aabb=aabb)
    o, d = rays_at(400, seed=22, dtype=dtype)
    near, far = torch.zeros(400, dtype=dtype), torch.full((400,), 1e10, dtype=dtype)
    got, ref = march_both(grid, o, d, near, far, 0.011)
    assert ref[0].numel() > 200
    assert_same_samples(got, ref)


def test_divides_where_the_reciprocal_is_inexact() -> None:
    """Samples on and one float next to the cell borders of a box whose extent is not a power of
    two: there x * (1 / e) and x / e pick different cells at some points (asserted), and the
    kernel must pick the twin's."""
    lo, hi, res, step = -0.35, 0.4, 15, 2.0**-6
    grid = OccupancyGrid(aabb=(lo, lo, lo, hi, hi, hi), resolution=res, levels=1)
    grid.binaries[0, ::2] = True  # slabs alternating along x
    low, extent = torch.tensor(lo), torch.tensor(hi) - torch.tensor(lo)
    x = low + torch.arange(1, res) * extent / res
    xs = torch.cat([x, x.nextafter(x + 1), x.nextafter(x - 1)])
    xs = xs[(xs - step / 2) + step / 2 == xs]  # one sample per ray, from an origin placing it on xs exactly
    assert (((xs - low) / extent * res).long() != ((xs - low) * (1 / extent) * res).long()).any()
    o = torch.stack([xs - step / 2, torch.full_like(xs, 0.03), torch.full_like(xs, 0.03)], -1)
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand_as(o).contiguous()
    got, ref = march_both(grid, o, d, torch.zeros(len(xs)), torch.full((len(xs),), step), step)
    assert 0 < ref[0].numel() < len(xs)
    assert_same_samples(got, ref)


@pytest.mark.parametrize("cone", [0.0, 0.03])
def test_matches_twin_float64(cone: float) -> None:
    grid = random_grid(16, 2, 0.1, seed=3)
    o, d = rays_at(300, seed=4, dtype=torch.float64)
    near, far = torch.zeros(300, dtype=torch.float64), torch.full((300,), 1e10, dtype=torch.float64)
    got, ref = march_both(grid, o, d, near, far, 0.011, cone)
    assert ref[0].numel() > 200 and got[1].dtype == torch.float64
    assert_same_samples(got, ref, t_atol=1e-12 if cone > 0 else 0.0)


def test_midpoints_on_cell_faces_and_rays_along_faces() -> None:
    """Every midpoint on a cell face (step 1/8, near 1/16, faces at multiples of 1/8), and rays
    running exactly along faces and edges of the cells (the float point sits on the border)."""
    grid = OccupancyGrid(aabb=(0, 0, 0, 1, 1, 1), resolution=8, levels=2)
    grid.binaries.copy_(torch.rand(grid.binaries.shape, generator=torch.Generator().manual_seed(5)) < 0.4)
    faces = torch.arange(9, dtype=torch.float32) / 8
    o = torch.stack(torch.meshgrid(faces, faces, torch.tensor([-1.0]), indexing="ij"), -1).reshape(-1, 3)
    o = torch.cat([o, o[:, [2, 0, 1]], o[:, [1, 2, 0]]])  # along z, x and y
    d = torch.zeros_like(o)
    n = o.shape[0] // 3
    d[:n, 2], d[n:2 * n, 0], d[2 * n:, 1] = 1.0, 1.0, 1.0
    o2, d2 = torch.cat([o, o + 3.0 * d]), torch.cat([d, -d])  # and back again from the far side
    near = torch.full((o2.shape[0],), 1 / 16)
    far = torch.full((o2.shape[0],), 1e10)
    got, ref = march_both(grid, o2, d2, near, far, 1 / 8)
    assert ref[0].numel() > 500
    assert_same_samples(got, ref)


def test_missing_rays_empty_and_full_grids() -> None:
    o, d = rays_at(200, seed=9)
    near, far = torch.zeros(200), torch.full((200,), 1e10)
    empty = random_grid(16, 2, 0.0, seed=0)
    got, ref = march_both(empty, o, d, near, far, 0.01)
    assert got[0].numel() == 0 and got[1].numel() == 0
    assert_same_samples(got, ref)
    full = random_grid(16, 2, 1.0, seed=0)
    got, ref = march_both(full, o, d, near, far, 0.02)
    assert_same_samples(got, ref)
    away = random_grid(16, 1, 1.0, seed=0)
    got, ref = march_both(away, o[20:40], d[20:40], near[20:40], far[20:40], 0.02)  # pointing away, from outside
    assert got[0].numel() == 0
    assert_same_samples(got, ref)
    zero_rays = march_rays_native(o[:0], d[:0], full.binaries, full.aabbs, near[:0], far[:0], 0.02)
    assert all(t.numel() == 0 for t in zero_rays)


def test_axis_parallel_rays_and_near_far_limits() -> None:
    """Direction components of exactly zero, near beyond far, far cutting the grid."""
    grid = random_grid(16, 3, 0.2, seed=11)
    o, d = rays_at(120, seed=12)
    d[:40, 1] = 0.0
    d[40:60, :2] = 0.0
    d = torch.nn.functional.normalize(d, dim=-1)
    near = torch.linspace(0.0, 3.0, 120)
    far = torch.linspace(6.0, 2.0, 120)
    got, ref = march_both(grid, o, d, near, far, 0.017)
    assert ref[0].numel() > 100
    assert_same_samples(got, ref)


def test_sampling_native_vs_torch_backend(monkeypatch) -> None:
    """OccupancyGrid.sampling through each backend: planes, per-ray limits, stratified jitter,
    cone steps and culling by sigma_fn give the same samples."""
    grid = random_grid(24, 2, 0.15, seed=13)
    o, d = rays_at(300, seed=14)
    t_min, t_max = torch.rand(300) * 2, torch.rand(300) * 4 + 3

    def sigma_fn(t0, t1, ray_indices):
        p = o[ray_indices] + d[ray_indices] * ((t0 + t1) / 2)[:, None]
        return 30.0 * torch.exp(-4 * ((p - torch.tensor([0.0, 0.5, 0.5])) ** 2).sum(-1))

    outs = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", backend)
        assert grid.backend == backend
        torch.manual_seed(0)
        outs[backend] = [grid.sampling(o, d, sigma_fn=sigma_fn, near_plane=0.2, far_plane=6.0, t_min=t_min, t_max=t_max,
                                       render_step_size=0.015, early_stop_eps=1e-3, stratified=True, cone_angle=c)
                         for c in (0.0, 0.01)]
    for got, ref in zip(outs["native"], outs["torch"]):
        assert ref[0].numel() > 100
        assert_same_samples(got, ref)


def test_mips_follow_in_place_updates(monkeypatch) -> None:
    """The native march's cached mips are rebuilt whenever the binaries change."""
    monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", "native")
    grid = random_grid(16, 1, 0.0, seed=0, aabb=(0, 0, 0, 1, 1, 1))
    o = torch.tensor([[0.5, 0.5, -1.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    assert grid.sampling(o, d, render_step_size=0.01)[0].numel() == 0
    grid.binaries[0, 8, 8, 4] = True
    assert grid.sampling(o, d, render_step_size=0.01)[0].numel() == 6  # one cell of 1/16 at step 0.01
    grid.update(0, lambda x: torch.zeros(len(x)))
    assert grid.sampling(o, d, render_step_size=0.01)[0].numel() == 0


def test_mips_free_blocks() -> None:
    """A mip block is free to skip when no occupied cell lies in it or within one cell of it, it
    does not touch an inner level's border, and, grown by one cell, it keeps clear of the finer
    level's box."""
    grid = OccupancyGrid(aabb=(0, 0, 0, 1, 1, 1), resolution=16, levels=2)
    grid.binaries[1, 12, 12, 12] = True  # level 1 (the box [-0.5, 1.5]^3), mip-1 block (6, 6, 6)
    mips = occupancy_mips(grid.binaries, grid.aabbs)
    # mips 1..4 of a 16^3 grid: 8^3, 4^3, 2^3, 1 cells per level, all levels of a mip together
    assert mips.numel() == 2 * (8**3 + 4**3 + 2**3 + 1)
    mip1 = mips[: 2 * 8**3].view(2, 8, 8, 8)
    inner, outer = mip1[0], mip1[1]
    # level 0 (inside level 1): its border blocks may round into level 1: never free
    assert inner[0].all() and inner[:, 7].all() and not inner[2:6, 2:6, 2:6].any()
    # level 1: the blocks within one cell of cell 12 (blocks 5 and 6 per axis) are not free, nor
    # those within one cell of level 0's box (cells 4..12: blocks 1..6); block 7 (cells 14, 15) is
    assert outer[5:7, 5:7, 5:7].all() and outer[1:7, 1:7, 1:7].all()
    assert not outer[7, 7, 7] and not outer[0, 0, 0] and not outer[7, 6, 6]
    assert int((outer == 0).sum()) == 8**3 - 6**3


def test_backend_order(monkeypatch) -> None:
    monkeypatch.delenv("FASTNEFES_BACKEND", raising=False)
    monkeypatch.delenv("FASTNEFES_OCCGRID_BACKEND", raising=False)
    assert backends.OPS["occgrid"] == ("nerfacc", "native", "torch")
    assert backends.resolve("occgrid", "cpu") == "native"
    monkeypatch.setenv("FASTNEFES_BACKEND", "torch")
    assert backends.resolve("occgrid", "cpu") == "torch"


def test_rejects_bad_inputs(native) -> None:
    grid = random_grid(8, 1, 0.5, seed=0)
    o, d = rays_at(4, seed=0)
    near, far = torch.zeros(4), torch.ones(4)
    mips = occupancy_mips(grid.binaries, grid.aabbs)
    with pytest.raises(ValueError, match="step > 0"):
        native.occgrid_march(o, d, near, far, grid.binaries, mips, grid.aabbs, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="mips"):
        native.occgrid_march(o, d, near, far, grid.binaries, mips[1:], grid.aabbs, 0.01, 0.0, 0)
    with pytest.raises(ValueError, match="near"):
        native.occgrid_march(o, d, near[:3], far, grid.binaries, mips, grid.aabbs, 0.01, 0.0, 0)
