"""Occupancy-grid estimator vs brute-force per-ray marching (nerfacc traversal semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from fastnefes.errors import FastnefesError
from fastnefes.ops import OccupancyGrid, backends


def brute_force_march(grid: OccupancyGrid, o, d, near, far, step, cone_angle=0.0):
    """One ray at a time, one step at a time: t_0 = near, t_{k+1} = t_k + clamp(t_k * cone, step, 1e10).

    Keeps [t_k, t_{k+1}] when its midpoint is inside the outermost AABB, in [near, far), and in an
    occupied cell of the finest level that contains it. Returns (ray, t_start, t_end) tuples.
    """
    out = []
    res = grid.resolution
    outer = grid.aabbs[-1].double()
    for r in range(o.shape[0]):
        oo, dd = o[r].double(), d[r].double()
        # slab test against the outermost box
        t_enter, t_exit = -math.inf, math.inf
        for a in range(3):
            inv = 1.0 / (dd[a].item() if abs(dd[a].item()) > 1e-12 else 1e-12)
            t1, t2 = (outer[a].item() - oo[a].item()) * inv, (outer[a + 3].item() - oo[a].item()) * inv
            t_enter, t_exit = max(t_enter, min(t1, t2)), min(t_exit, max(t1, t2))
        if not (t_exit > t_enter and t_exit > 0):
            continue
        lo, hi = max(t_enter, near[r]), min(t_exit, far[r])
        t, k = near[r], 0
        while True:
            dt = min(max(t * cone_angle, step), 1e10)
            t_next = (near[r] + (k + 1) * step) if cone_angle == 0 else t + dt
            mid = float(torch.tensor((t + t_next) / 2, dtype=torch.float32))
            if mid >= hi:
                break
            if mid >= lo:
                p = oo + dd * mid
                occupied = None
                for level in range(grid.levels):  # finest level containing the point decides
                    box = grid.aabbs[level].double()
                    u = (p - box[:3]) / (box[3:] - box[:3])
                    if bool(((u >= 0) & (u <= 1)).all()):
                        ijk = [min(int(math.floor(u[a].item() * res)), res - 1) for a in range(3)]
                        occupied = bool(grid.binaries[level, ijk[0], ijk[1], ijk[2]])
                        break
                if occupied:
                    out.append((r, t, t_next))
            t, k = t_next, k + 1
    return out


def _random_grid(res=8, levels=2, seed=0, p=0.35, aabb=(-1.0, -0.5, 0.0, 1.0, 1.5, 1.0)):
    grid = OccupancyGrid(aabb=aabb, resolution=res, levels=levels)
    g = torch.Generator().manual_seed(seed)
    grid.binaries.copy_(torch.rand(grid.binaries.shape, generator=g) < p)
    return grid


def _rays(n, seed, centre=(0.0, 0.5, 0.5), spread=1.0, dist=4.0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, 3, generator=g)
    o = torch.nn.functional.normalize(o, dim=-1) * dist + torch.tensor(centre)
    target = torch.tensor(centre) + (torch.rand(n, 3, generator=g) - 0.5) * spread
    d = torch.nn.functional.normalize(target - o, dim=-1)
    return o, d


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", "torch")


def _assert_same(samples, ref, atol=1e-5):
    ri, ts, te = samples
    assert ri.dtype == torch.long
    assert len(ref) == ri.numel(), (len(ref), ri.numel())
    assert ri.tolist() == [r for r, _, _ in ref]
    assert torch.allclose(ts, torch.tensor([a for _, a, _ in ref], dtype=ts.dtype), atol=atol)
    assert torch.allclose(te, torch.tensor([b for _, _, b in ref], dtype=te.dtype), atol=atol)


@pytest.mark.parametrize("levels,cone", [(1, 0.0), (2, 0.0), (3, 0.0), (2, 0.05)])
def test_march_matches_brute_force(levels, cone):
    grid = _random_grid(levels=levels, seed=levels)
    o, d = _rays(40, seed=10 + levels)
    o[0] = torch.tensor([0.1, 0.4, 0.6])  # starts inside the grid
    step = 0.05
    near = [0.3] * len(o)
    far = [1e10] * len(o)
    far[5] = 3.9  # far plane cuts some rays
    t_max = torch.tensor(far)
    got = grid.sampling(o, d, near_plane=0.3, t_max=t_max, render_step_size=step, cone_angle=cone)
    ref = brute_force_march(grid, o, d, near, far, step, cone)
    assert len(ref) > 100  # the case is not trivial
    _assert_same(got, ref)


@pytest.mark.parametrize("levels,cone", [(1, 0.0), (2, 0.02)])
def test_empty_block_skipping_is_exact(monkeypatch, levels, cone):
    """The coarse (8^3-cell block) skip only saves work: same samples as the plain march."""
    from fastnefes.ops.occgrid import _torch_impl

    grid = OccupancyGrid(aabb=(-1, -1, -1, 1, 1, 1), resolution=32, levels=levels)
    grid.update(0, lambda x: ((x.abs().amax(-1) > 0.85) | ((x - 0.3).norm(dim=-1) < 0.2)).float())
    grid.binaries &= torch.rand(grid.binaries.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    g = torch.Generator().manual_seed(1)
    o = (torch.rand(200, 3, generator=g) - 0.5) * 0.6
    d = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=-1)
    got = grid.sampling(o, d, render_step_size=0.008, cone_angle=cone)
    monkeypatch.setattr(_torch_impl, "_skip_empty_blocks", lambda *a: a[3:6])
    plain = grid.sampling(o, d, render_step_size=0.008, cone_angle=cone)
    assert got[0].numel() > 1000
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_empty_grid_and_missing_rays():
    grid = _random_grid(p=0.0)
    o, d = _rays(10, seed=3)
    ri, ts, te = grid.sampling(o, d, render_step_size=0.01)
    assert ri.numel() == 0 and ts.numel() == 0
    grid = _random_grid(p=1.0)
    away = -d  # pointing away from the grid
    assert grid.sampling(o, away, render_step_size=0.01)[0].numel() == 0


def test_alpha_culling_and_early_stop_match_brute_force():
    grid = _random_grid(levels=2, seed=5, p=0.6)
    grid.occs.fill_(0.5)  # mean occupancy 0.5 > alpha_thre: alpha_thre applies as given
    o, d = _rays(30, seed=6)
    step = 0.04

    def density_at(ray_indices, t_mid):
        p = o[ray_indices] + d[ray_indices] * t_mid[:, None]
        return 40.0 * torch.exp(-4 * ((p - torch.tensor([0.0, 0.5, 0.5])) ** 2).sum(-1))

    def sigma_fn(t_starts, t_ends, ray_indices):
        return density_at(ray_indices, (t_starts + t_ends) / 2)

    eps, alpha_thre = 1e-2, 0.05
    got = grid.sampling(o, d, sigma_fn=sigma_fn, render_step_size=step, early_stop_eps=eps, alpha_thre=alpha_thre)
    marched = brute_force_march(grid, o, d, [0.0] * len(o), [1e10] * len(o), step)
    ref, transmittance, r_prev = [], 1.0, -1
    for r, a, b in marched:
        if r != r_prev:
            transmittance, r_prev = 1.0, r
        tau = density_at(torch.tensor([r]), torch.tensor([(a + b) / 2], dtype=torch.float32)).item() * (b - a)
        alpha = 1 - math.exp(-tau)
        if transmittance >= eps and alpha >= alpha_thre:
            ref.append((r, a, b))
        transmittance *= math.exp(-tau)
    assert 0 < len(ref) < len(marched) - 50  # culling removed a substantial part
    _assert_same(got, ref)
    # alpha_thre is capped by the grid's mean occupancy (nerfacc): with mean 0 only early stop applies
    grid.occs.zero_()
    loose = grid.sampling(o, d, sigma_fn=sigma_fn, render_step_size=step, early_stop_eps=eps, alpha_thre=alpha_thre)
    assert loose[0].numel() > got[0].numel()


def test_stratified_jitters_each_ray_within_one_step():
    grid = _random_grid(p=1.0, levels=1)
    o, d = _rays(20, seed=8)
    step = 0.05
    base_offsets = torch.remainder(grid.sampling(o, d, render_step_size=step)[1], step)
    assert base_offsets.max() < 1e-4 or (step - base_offsets).min() < 1e-4  # anchored at near = 0
    torch.manual_seed(0)
    ri, ts, te = grid.sampling(o, d, render_step_size=step, stratified=True)
    assert torch.allclose(te - ts, torch.full_like(ts, step), atol=1e-5)
    offsets = torch.remainder(ts, step)
    per_ray = [offsets[ri == r] for r in ri.unique()]
    assert all(((x - x[0]).abs() < 1e-4).all() for x in per_ray)  # one shift per ray
    assert len({round(x[0].item(), 4) for x in per_ray}) > len(per_ray) // 2  # shifts differ between rays


def _dense_occ(x: torch.Tensor) -> torch.Tensor:
    """Opacity 1 in the half-space x < 0, else 0 (constant within every cell of the grids below)."""
    return (x[:, 0] < 0).float()


def test_update_warmup_ema_and_threshold():
    grid = OccupancyGrid(aabb=(-1, -1, -1, 1, 1, 1), resolution=4, levels=2)
    grid.update(step=0, occ_eval_fn=_dense_occ, warmup_steps=10)
    occ = grid.occs.view(2, 4, 4, 4)
    assert (occ[:, :2] == 1).all() and (occ[:, 2:] == 0).all()  # every cell evaluated in warm-up
    assert torch.equal(grid.binaries, occ > min(grid.occs.mean().item(), 0.01))
    # EMA: with zero opacity everywhere, occupancies decay geometrically
    grid.update(step=1, occ_eval_fn=lambda x: torch.zeros(len(x)), ema_decay=0.9, warmup_steps=10)
    assert torch.allclose(grid.occs.view(2, 4, 4, 4)[:, :2], torch.full((2, 2, 4, 4), 0.9))
    # threshold is min(mean, occ_thre): mean = 0.45 -> 0.01 decides; with occ_thre=0.95 the mean does
    grid.update(step=2, occ_eval_fn=lambda x: torch.zeros(len(x)), ema_decay=1.0, occ_thre=0.95, warmup_steps=10)
    assert grid.binaries.view(2, 4, 4, 4)[:, :2].all() and not grid.binaries.view(2, 4, 4, 4)[:, 2:].any()


def test_update_after_warmup_samples_subset_and_keeps_occupied():
    grid = OccupancyGrid(aabb=(-1, -1, -1, 1, 1, 1), resolution=8, levels=1)
    grid.update(0, lambda x: (x[:, 0] < -0.5).float())  # 128 occupied cells = n (512 // 4)
    before = grid.occs.clone()
    torch.manual_seed(1)
    grid.update(1000, lambda x: torch.full((len(x),), 0.5), ema_decay=0.5, warmup_steps=10)
    after = grid.occs
    updated = after != before
    # updated cells follow max(old * decay, new); the others are untouched
    assert torch.allclose(after[updated], torch.maximum(before[updated] * 0.5, torch.tensor(0.5)))
    frac = updated.float().mean().item()
    assert 0.1 < frac < 0.75  # 1/4 uniform + occupied (<= 1/4), not all cells
    occupied_before = before > 0.01
    assert updated[occupied_before & (before * 0.5 != 0.5)].all()  # all occupied cells (count <= n) are visited


def test_update_after_warmup_is_reproducible_with_repeated_cells():
    """Random cells repeat (uniform draws, occupied draws); the scattered EMA write must not
    depend on which duplicate lands last, or training stops being reproducible."""

    def run() -> torch.Tensor:
        grid = OccupancyGrid(aabb=(-1, -1, -1, 1, 1, 1), resolution=16, levels=1)
        grid.update(0, lambda x: (x[:, 0] < 0.0).float())
        torch.manual_seed(3)
        for step in range(100, 104):
            grid.update(step, lambda x: torch.sin(40 * x).sum(-1).abs(), ema_decay=0.9, warmup_steps=10)
        cells = grid._uniform_and_occupied_cells(grid.cells_per_lvl // 4)[0]
        assert cells.numel() == torch.unique(cells).numel()
        return grid.occs.clone()

    assert torch.equal(run(), run())


def test_update_every_n_steps_and_training_mode():
    grid = OccupancyGrid(resolution=4)
    calls = []

    def fn(x):
        calls.append(len(x))
        return torch.ones(len(x))

    for step in range(5):
        grid.update_every_n_steps(step, fn, n=2)
    assert len(calls) == 3 and calls[0] == 64
    grid.eval()
    with pytest.raises(RuntimeError):
        grid.update_every_n_steps(0, fn)


def test_state_dict_round_trip():
    grid = _random_grid(levels=2)
    grid.occs.uniform_()
    state = grid.state_dict()
    assert set(state) == {"aabbs", "occs", "binaries"}
    assert state["aabbs"].shape == (2, 6) and state["occs"].shape == (2 * 8**3,)
    other = OccupancyGrid(aabb=(-1.0, -0.5, 0.0, 1.0, 1.5, 1.0), resolution=8, levels=2)
    other.load_state_dict(state)
    assert torch.equal(other.binaries, grid.binaries) and torch.equal(other.occs, grid.occs)
    # level 1 is level 0's box scaled 2x about its centre
    assert torch.allclose(grid.aabbs[1], torch.tensor([-2.0, -1.5, -0.5, 2.0, 2.5, 1.5]))


def test_mark_invisible_cells():
    grid = OccupancyGrid(aabb=(-1, -1, -1, 1, 1, 1), resolution=4)
    K = torch.tensor([[[50.0, 0, 50], [0, 50.0, 50], [0, 0, 1]]])
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = -1.5  # camera at z=-1.5 looking along +z (90 deg field of view)
    grid.mark_invisible_cells(K, c2w, 100, 100)
    occ = grid.occs.view(4, 4, 4)
    assert (occ[1:3, 1:3] == 0).all()  # central cells visible
    assert occ[0, 0, 0] == -1 and occ[3, 3, 0] == -1  # corners next to the camera are outside the view
    invisible = grid.occs < 0
    grid.update(0, lambda x: torch.ones(len(x)))
    assert (grid.occs[invisible] == -1).all() and (grid.occs[~invisible] == 1).all()  # never evaluated


def test_bad_config():
    with pytest.raises(FastnefesError):
        OccupancyGrid(aabb=(0, 0, 0, 1, -1, 1))
    with pytest.raises(FastnefesError):
        OccupancyGrid(resolution=0)


def test_nerfacc_probe_refuses_cpu():
    from fastnefes.ops.occgrid import _nerfacc

    assert _nerfacc._probe("cpu") is not None
    assert backends.resolve("occgrid", "cpu") == "torch"


def _nerfacc_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    from fastnefes.ops.occgrid import _nerfacc

    return _nerfacc._probe("cuda")


@pytest.mark.skipif(_nerfacc_reason() is not None, reason=f"nerfacc backend unavailable: {_nerfacc_reason()}")
def test_nerfacc_matches_torch_march(monkeypatch):
    grid = _random_grid(res=32, levels=2, seed=9).cuda()
    o, d = _rays(500, seed=10)
    o, d = o.cuda(), d.cuda()
    monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", "nerfacc")
    assert grid.backend == "nerfacc"
    ri, ts, te = grid.sampling(o, d, render_step_size=0.01)
    monkeypatch.setenv("FASTNEFES_OCCGRID_BACKEND", "torch")
    ri2, ts2, te2 = grid.sampling(o, d, render_step_size=0.01)
    # nerfacc accumulates t in float32, the torch march uses near + k * step: a few midpoints on
    # cell faces may flip, nothing more
    assert abs(ri.numel() - ri2.numel()) <= 1e-3 * ri2.numel() + 2
    per_ray = torch.bincount(ri, minlength=500) - torch.bincount(ri2, minlength=500)
    assert per_ray.abs().max() <= 2
