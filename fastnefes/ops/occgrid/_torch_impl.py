"""Pure-PyTorch occupancy-grid marching with nerfacc's traversal semantics.

nerfacc (grid.cu, traverse_grids) marches every ray from its near plane with steps
dt(t) = clamp(t * cone_angle, step, 1e10): t_0 = near, t_{k+1} = t_k + dt(t_k). Sample k is the
interval [t_k, t_{k+1}]; it is kept when its midpoint lies inside the outermost grid's AABB,
within [near, far), and in an occupied cell of the finest level containing it. Here all rays
march in parallel: per ray, the candidate steps that can fall in the occupied region are
enumerated in closed form and the midpoints looked up in the binary grids.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fastnefes.ops.composite._torch_impl import exclusive_segment_sum

# Candidate samples evaluated per chunk (bounds the temporaries of the parallel march).
MARCH_CHUNK = 1 << 21


def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test. rays [R,3], aabbs [M,6] -> t_min [R,M], t_max [R,M], hit [R,M] (t_max > t_min, t_max > 0)."""
    d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    inv_d = 1.0 / d
    t1 = (aabbs[None, :, :3] - rays_o[:, None, :]) * inv_d[:, None, :]
    t2 = (aabbs[None, :, 3:] - rays_o[:, None, :]) * inv_d[:, None, :]
    t_min = torch.minimum(t1, t2).amax(dim=-1)
    t_max = torch.maximum(t1, t2).amin(dim=-1)
    return t_min, t_max, (t_max > t_min) & (t_max > 0)


def occupied_at(points: Tensor, binaries: Tensor, aabbs: Tensor) -> Tensor:
    """points [M,3] -> bool [M]: occupancy of the finest level whose AABB contains the point.

    binaries [L,res,res,res] (x-major, as nerfacc), aabbs [L,6] nested (level l+1 contains level l).
    """
    n_levels, res = binaries.shape[0], binaries.shape[1:]
    res_t = torch.tensor(res, device=points.device)
    flat = binaries.reshape(-1)
    cell_id = torch.full(points.shape[:1], -1, dtype=torch.long, device=points.device)
    for level in reversed(range(n_levels)):  # finer levels overwrite coarser ones
        lo, hi = aabbs[level, :3], aabbs[level, 3:]
        u = (points - lo) / (hi - lo)
        inside = ((u >= 0) & (u <= 1)).all(dim=-1)
        ijk = torch.minimum((u * res_t).long().clamp(min=0), res_t - 1)
        ids = ((level * res[0] + ijk[:, 0]) * res[1] + ijk[:, 1]) * res[2] + ijk[:, 2]
        cell_id = torch.where(inside, ids, cell_id)
    return (cell_id >= 0) & flat[cell_id.clamp(min=0)]


def _step_positions(k: Tensor, near: Tensor, step: float, cone_angle: float) -> Tensor:
    """t_k of the march from `near` (float64): constant steps until t * cone >= step, then geometric."""
    if cone_angle <= 0:
        return near + k * step
    t_switch = step / cone_angle
    k0 = torch.clamp(torch.ceil((t_switch - near) / step), min=0)
    t_k0 = near + k0 * step
    return torch.where(k <= k0, near + k * step, t_k0 * torch.pow(1.0 + cone_angle, k - k0))


def _step_index_before(t: Tensor, near: Tensor, step: float, cone_angle: float) -> Tensor:
    """A step index k with t_k <= t (approximately the largest), float64."""
    k = torch.floor((t - near) / step)
    if cone_angle > 0:
        t_switch = step / cone_angle
        k0 = torch.clamp(torch.ceil((t_switch - near) / step), min=0)
        t_k0 = near + k0 * step
        k_geo = k0 + torch.floor(torch.log(torch.clamp(t / t_k0, min=1.0)) / math.log1p(cone_angle))
        k = torch.where(k <= k0, k, k_geo)
    return torch.clamp(k, min=0)


def march_rays(rays_o: Tensor, rays_d: Tensor, binaries: Tensor, aabbs: Tensor, near: Tensor, far: Tensor,
               step: float, cone_angle: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Occupied march samples of all rays.

    Args:
        rays_o, rays_d: [R,3]; near, far: [R] per-ray march range (the march is anchored at near).
        binaries: [L,res,res,res] bool; aabbs: [L,6].
    Returns:
        ray_indices [N] long (sorted), t_starts [N], t_ends [N] (rays_o's dtype).
    """
    device, dtype = rays_o.device, rays_o.dtype
    t_min, t_max, hit = ray_aabb_intersect(rays_o, rays_d, aabbs[-1:])
    t_lo = torch.maximum(t_min[:, 0], near)
    t_hi = torch.minimum(t_max[:, 0], far)
    occ_box = _occupied_box(binaries, aabbs)
    if occ_box is None:
        return _empty(device, dtype)
    # Only the occupied region can produce samples: tighten each ray's range to its box.
    b_min, b_max, b_hit = ray_aabb_intersect(rays_o, rays_d, occ_box[None])
    valid = hit[:, 0] & (t_lo < t_hi) & b_hit[:, 0]
    near64 = near.double()
    # One spare step on each side; the exact midpoint test decides.
    k_first = torch.clamp(_step_index_before(torch.maximum(t_lo, b_min[:, 0]).double(), near64, step, cone_angle) - 1, min=0)
    k_last = _step_index_before(torch.minimum(t_hi, b_max[:, 0]).double(), near64, step, cone_angle) + 1
    counts = torch.where(valid, (k_last - k_first + 1).clamp(min=0), torch.zeros_like(k_first)).long()
    rays = torch.arange(rays_o.shape[0], device=device)
    seg_ray, seg_k, seg_n = rays[counts > 0], k_first[counts > 0], counts[counts > 0]
    seg_ray, seg_k, seg_n = _skip_empty_blocks(rays_o, rays_d, near64, seg_ray, seg_k, seg_n, binaries, aabbs,
                                               step, cone_angle)

    out_rays, out_starts, out_ends = [], [], []
    for lo, hi in _chunks(seg_n, MARCH_CHUNK):
        ray_of, k = _expand_segments(seg_ray[lo:hi], seg_k[lo:hi], seg_n[lo:hi])
        t0 = _step_positions(k, near64[ray_of], step, cone_angle).to(dtype)
        t1 = _step_positions(k + 1, near64[ray_of], step, cone_angle).to(dtype)
        mid = (t0 + t1) * 0.5
        keep = (mid >= t_lo[ray_of]) & (mid < t_hi[ray_of])
        keep &= occupied_at(rays_o[ray_of] + rays_d[ray_of] * mid[:, None], binaries, aabbs)
        out_rays.append(ray_of[keep])
        out_starts.append(t0[keep])
        out_ends.append(t1[keep])
    if not out_rays:
        return _empty(device, dtype)
    return torch.cat(out_rays), torch.cat(out_starts), torch.cat(out_ends)


def _empty(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=dtype, device=device),
            torch.empty(0, dtype=dtype, device=device))


def _expand_segments(seg_ray: Tensor, seg_k: Tensor, seg_n: Tensor) -> tuple[Tensor, Tensor]:
    """Segments (ray, first step k, n steps) -> per step: ray [M] long, k [M] float64."""
    ray_of = torch.repeat_interleave(seg_ray, seg_n)
    seg_of = torch.repeat_interleave(torch.arange(seg_n.numel(), device=seg_n.device), seg_n)
    first = torch.cumsum(seg_n, 0) - seg_n
    k = seg_k[seg_of] + (torch.arange(ray_of.numel(), device=seg_n.device) - first[seg_of]).double()
    return ray_of, k


def _chunks(counts: Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose counts sum to about `budget` (at least one entry each)."""
    cum = torch.cumsum(counts, 0).cpu().numpy()
    chunks, lo, n = [], 0, counts.shape[0]
    while lo < n:
        base = int(cum[lo - 1]) if lo > 0 else 0
        hi = min(max(int(np.searchsorted(cum, base + budget, side="right")), lo + 1), n)
        chunks.append((lo, hi))
        lo = hi
    return chunks


def _skip_empty_blocks(rays_o: Tensor, rays_d: Tensor, near64: Tensor, seg_ray: Tensor, seg_k: Tensor, seg_n: Tensor,
                       binaries: Tensor, aabbs: Tensor, step: float, cone_angle: float) -> tuple[Tensor, Tensor, Tensor]:
    """Split segments into blocks of steps and drop the blocks that cannot touch an occupied cell.

    Conservative (the exact per-sample test follows): a block whose half-length h is at most one
    coarse cell (8^3 fine cells, level 0) is dropped when, at every level whose box lies within h
    of the block's midpoint, the coarse occupancy dilated by one coarse cell is empty there.
    """
    res = binaries.shape[1]
    factor = max(1, res // 16)
    coarse_size = (aabbs[0, 3:] - aabbs[0, :3]).min().item() * factor / res  # level 0, smallest axis
    block = int(2 * coarse_size / step)
    if block < 4 or seg_n.numel() == 0:
        return seg_ray, seg_k, seg_n
    n_blocks = (seg_n + block - 1) // block
    b_seg = torch.repeat_interleave(torch.arange(seg_n.numel(), device=seg_n.device), n_blocks)
    b_first = torch.cumsum(n_blocks, 0) - n_blocks
    b_index = torch.arange(b_seg.numel(), device=seg_n.device) - b_first[b_seg]
    b_ray = seg_ray[b_seg]
    b_k = seg_k[b_seg] + (b_index * block).double()
    b_n = torch.minimum(seg_n[b_seg] - b_index * block, torch.full_like(b_index, block))
    t0 = _step_positions(b_k, near64[b_ray], step, cone_angle)
    t1 = _step_positions(b_k + b_n.double(), near64[b_ray], step, cone_angle)
    half = (t1 - t0) / 2
    mid_points = (rays_o[b_ray].double() + rays_d[b_ray].double() * ((t0 + t1) / 2)[:, None])
    keep = half > coarse_size  # too long for the conservative test (large cone steps): keep
    dilated = _dilated_coarse(binaries, factor)
    c_res = dilated.shape[1]
    for level in range(binaries.shape[0]):
        lo, hi = aabbs[level, :3].double(), aabbs[level, 3:].double()
        u = (mid_points - lo) / (hi - lo)
        margin = half[:, None] / (hi - lo)
        near_box = ((u >= -margin) & (u <= 1 + margin)).all(-1)
        ijk = (u.clamp(0, 1) * (res / factor)).long().clamp(0, c_res - 1)
        keep |= near_box & dilated[level, ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    return b_ray[keep], b_k[keep], b_n[keep]


def _dilated_coarse(binaries: Tensor, factor: int) -> Tensor:
    """[L,res^3] bool -> [L,c^3] bool: any occupied fine cell in the coarse cell or its 26 neighbours."""
    grid = binaries.float()[:, None]
    coarse = torch.nn.functional.max_pool3d(grid, factor, factor, ceil_mode=True)
    return torch.nn.functional.max_pool3d(coarse, 3, 1, padding=1)[:, 0] > 0


def _occupied_box(binaries: Tensor, aabbs: Tensor) -> Tensor | None:
    """World AABB [6] of all occupied cells of all levels (slightly enlarged), None if none."""
    res = torch.tensor(binaries.shape[1:], device=aabbs.device, dtype=aabbs.dtype)
    lows, highs = [], []
    for level in range(binaries.shape[0]):
        ijk = torch.nonzero(binaries[level])
        if ijk.shape[0] == 0:
            continue
        size = (aabbs[level, 3:] - aabbs[level, :3]) / res
        lows.append(aabbs[level, :3] + ijk.amin(0).to(aabbs.dtype) * size)
        highs.append(aabbs[level, :3] + (ijk.amax(0) + 1).to(aabbs.dtype) * size)
    if not lows:
        return None
    lo, hi = torch.stack(lows).amin(0), torch.stack(highs).amax(0)
    pad = 1e-4 * (hi - lo).max()
    return torch.cat([lo - pad, hi + pad])


def visibility_mask(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor, n_rays: int,
                    sigma_fn: Callable | None, alpha_fn: Callable | None,
                    early_stop_eps: float, alpha_thre: float) -> Tensor:
    """nerfacc's render_visibility_from_{density,alpha}: T_j >= early_stop_eps and alpha_j >= alpha_thre."""
    if sigma_fn is not None:
        sigmas = sigma_fn(t_starts, t_ends, ray_indices)
        if sigmas.shape != t_starts.shape:
            raise ValueError(f"sigma_fn must return [N] = {tuple(t_starts.shape)}, got {tuple(sigmas.shape)}")
        sigma_dt = sigmas * (t_ends - t_starts)
        alphas = 1.0 - torch.exp(-sigma_dt)
    else:
        alphas = alpha_fn(t_starts, t_ends, ray_indices)
        if alphas.shape != t_starts.shape:
            raise ValueError(f"alpha_fn must return [N] = {tuple(t_starts.shape)}, got {tuple(alphas.shape)}")
        sigma_dt = -torch.log(torch.clamp(1.0 - alphas, min=1e-10))
    trans = torch.exp(-exclusive_segment_sum(sigma_dt, ray_indices, n_rays))
    vis = trans >= early_stop_eps
    if alpha_thre > 0:
        vis = vis & (alphas >= alpha_thre)
    return vis
