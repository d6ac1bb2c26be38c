"""Occupancy-grid estimator (nerfacc OccGridEstimator behaviour): EMA-updated multi-level binary
grids for empty-space skipping, and marching that returns packed samples.

Backend (fastnefes.ops.backends, op "occgrid"): nerfacc's CUDA traversal when available, else the
native march (csrc, CPU and CUDA), else the pure-torch march in _torch_impl. All read the same
buffers (aabbs, occs, binaries) and the native and torch marches return the same samples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastnefes.errors import FastnefesError
from fastnefes.ops import backends
from fastnefes.ops.occgrid._native import march_rays_native, occupancy_mips
from fastnefes.ops.occgrid.culling import CullSchedule
from fastnefes.ops.occgrid._torch_impl import march_rays, visibility_mask

__all__ = ["OccupancyGrid"]

# Points per occ_eval_fn call during updates (bounds the field's activations).
_EVAL_CHUNK = 1 << 18


def _enlarge_aabb(aabb: Tensor, factor: float) -> Tensor:
    centre, half = (aabb[:3] + aabb[3:]) / 2, (aabb[3:] - aabb[:3]) / 2
    return torch.cat([centre - half * factor, centre + half * factor])


class OccupancyGrid(nn.Module):
    """Multi-level occupancy grid; level l covers `aabb` scaled 2^l about its centre.

    Buffers (in state_dict): aabbs [L,6], occs [L*res^3] (EMA occupancy, -1 = never seen),
    binaries [L,res,res,res] bool (cell index x*res^2 + y*res + z, as nerfacc).
    """

    def __init__(self, aabb: Sequence[float] | Tensor = (0, 0, 0, 1, 1, 1), resolution: int = 128, levels: int = 1) -> None:
        super().__init__()
        roi = torch.as_tensor(aabb, dtype=torch.float32).flatten()
        if roi.shape != (6,) or not bool((roi[3:] > roi[:3]).all()):
            raise FastnefesError(f"occupancy grid aabb {roi.tolist()}: expected (xmin, ymin, zmin, xmax, ymax, zmax) with max > min")
        if not (isinstance(resolution, int) and resolution >= 1) or not (isinstance(levels, int) and 1 <= levels <= 8):
            raise FastnefesError(f"occupancy grid resolution={resolution}, levels={levels}: expected resolution >= 1, levels in 1..8")
        self.resolution = resolution
        self.levels = levels
        self.cells_per_lvl = resolution**3
        self.register_buffer("aabbs", torch.stack([_enlarge_aabb(roi, 2.0**i) for i in range(levels)]))
        self.register_buffer("occs", torch.zeros(levels * self.cells_per_lvl))
        self.register_buffer("binaries", torch.zeros(levels, resolution, resolution, resolution, dtype=torch.bool))
        self.culling = CullSchedule()  # when renders run the culling pre-pass (not saved)
        self._mips_of: tuple[Tensor, int] | None = None  # (binaries tensor, its version) the mips belong to
        self._mips: Tensor | None = None

    @property
    def backend(self) -> str:
        """Name of the marching backend used for this grid's device."""
        return backends.resolve("occgrid", self.occs.device.type)

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sampling(self, rays_o: Tensor, rays_d: Tensor, sigma_fn: Callable | None = None, alpha_fn: Callable | None = None,
                 near_plane: float = 0.0, far_plane: float = 1e10, t_min: Tensor | None = None, t_max: Tensor | None = None,
                 render_step_size: float = 1e-3, early_stop_eps: float = 1e-4, alpha_thre: float = 0.0,
                 stratified: bool = False, cone_angle: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """March rays through occupied cells.

        Args:
            rays_o, rays_d: [R,3] origins and unit directions.
            sigma_fn(t_starts [N], t_ends [N], ray_indices [N]) -> sigmas [N] (or alpha_fn -> alphas [N]):
                used to drop samples with T < early_stop_eps or alpha < min(alpha_thre, mean occ).
            t_min, t_max: optional [R] per-ray limits, combined with near/far planes.
            stratified: jitter each ray's march start by U(0, step).
        Returns:
            ray_indices [N] long sorted, t_starts [N], t_ends [N].
        """
        if rays_o.dim() != 2 or rays_o.shape[1] != 3 or rays_d.shape != rays_o.shape:
            raise ValueError(f"sampling: rays_o / rays_d must be [R,3], got {tuple(rays_o.shape)}, {tuple(rays_d.shape)}")
        if sigma_fn is not None and alpha_fn is not None:
            raise ValueError("sampling: give sigma_fn or alpha_fn, not both")
        if self.backend == "nerfacc":
            from fastnefes.ops.occgrid._nerfacc import sampling_nerfacc

            return sampling_nerfacc(self, rays_o, rays_d, sigma_fn, alpha_fn, near_plane, far_plane, t_min, t_max,
                                    render_step_size, early_stop_eps, alpha_thre, stratified, cone_angle)
        near = torch.full_like(rays_o[:, 0], near_plane)
        far = torch.full_like(rays_o[:, 0], far_plane)
        if t_min is not None:
            near = torch.maximum(near, t_min.to(near))
        if t_max is not None:
            far = torch.minimum(far, t_max.to(far))
        if stratified:
            near = near + torch.rand_like(near) * render_step_size
        if self.backend == "native":
            ray_indices, t_starts, t_ends = march_rays_native(rays_o, rays_d, self.binaries, self.aabbs, near, far,
                                                              render_step_size, cone_angle, self._native_mips())
        else:
            ray_indices, t_starts, t_ends = march_rays(rays_o, rays_d, self.binaries, self.aabbs, near, far,
                                                       render_step_size, cone_angle)
        if (alpha_thre > 0.0 or early_stop_eps > 0.0) and (sigma_fn is not None or alpha_fn is not None) and ray_indices.numel():
            if alpha_thre > 0.0:  # capped by the mean occupancy (nerfacc); a reduction and a sync saved otherwise
                alpha_thre = min(alpha_thre, self.occs.mean().item())
            keep = visibility_mask(t_starts, t_ends, ray_indices, rays_o.shape[0], sigma_fn, alpha_fn,
                                   early_stop_eps, alpha_thre)
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts, t_ends

    def _native_mips(self) -> Tensor | None:
        """The native march's coarse occupancies of `binaries`, rebuilt only when they change: every
        in-place write bumps the tensor's version, `.to()` makes a new tensor (compared by identity;
        holding it keeps its memory from being reused by another)."""
        b = self.binaries
        if self._mips_of is None or self._mips_of[0] is not b or self._mips_of[1] != b._version:
            self._mips, self._mips_of = occupancy_mips(b, self.aabbs), (b, b._version)
        return self._mips

    # ---- update ---------------------------------------------------------------------------
    def _cell_coords(self, indices: Tensor) -> Tensor:
        """Flat cell indices [M] -> integer (x, y, z) [M,3] (x-major)."""
        res = self.resolution
        return torch.stack([indices // (res * res), (indices // res) % res, indices % res], dim=-1)

    def _all_cells(self) -> list[Tensor]:
        """Per level, the cells not marked invisible (occ >= 0)."""
        return [torch.nonzero(self.occs[lvl * self.cells_per_lvl:(lvl + 1) * self.cells_per_lvl] >= 0)[:, 0]
                for lvl in range(self.levels)]

    def _uniform_and_occupied_cells(self, n: int) -> list[Tensor]:
        """Per level, n uniform random visible cells plus up to n random occupied cells."""
        out = []
        for lvl in range(self.levels):
            uniform = torch.randint(self.cells_per_lvl, (n,), device=self.occs.device)
            uniform = uniform[self.occs[lvl * self.cells_per_lvl + uniform] >= 0]
            occupied = torch.nonzero(self.binaries[lvl].flatten())[:, 0]
            if n < occupied.numel():
                occupied = occupied[torch.randint(occupied.numel(), (n,), device=self.occs.device)]
            # Unique: with a repeated cell the scattered EMA write below would keep whichever
            # duplicate the threads write last, and training would stop being reproducible.
            out.append(torch.unique(torch.cat([uniform, occupied])))
        return out

    @torch.no_grad()
    def update(self, step: int, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 0.01,
               ema_decay: float = 0.95, warmup_steps: int = 256) -> None:
        """One EMA update: occ = max(occ * ema_decay, occ_eval_fn(jittered cell point)); binaries = occ > min(mean, thre)."""
        cells = self._all_cells() if step < warmup_steps else self._uniform_and_occupied_cells(self.cells_per_lvl // 4)
        for lvl, indices in enumerate(cells):
            coords = self._cell_coords(indices).to(self.aabbs.dtype)
            unit = (coords + torch.rand_like(coords)) / self.resolution
            lo, hi = self.aabbs[lvl, :3], self.aabbs[lvl, 3:]
            x = lo + unit * (hi - lo)
            occ = torch.cat([occ_eval_fn(chunk).reshape(-1) for chunk in x.split(_EVAL_CHUNK)]) if x.numel() else x[:, 0]
            cell_ids = lvl * self.cells_per_lvl + indices
            self.occs[cell_ids] = torch.maximum(self.occs[cell_ids] * ema_decay, occ.to(self.occs.dtype))
        visible = self.occs[self.occs >= 0]
        thre = min(visible.mean().item(), occ_thre) if visible.numel() else occ_thre
        self.binaries.copy_((self.occs > thre).view(self.binaries.shape))

    @torch.no_grad()
    def update_every_n_steps(self, step: int, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 0.01,
                             ema_decay: float = 0.95, warmup_steps: int = 256, n: int = 16) -> None:
        """Call `update` when step % n == 0 (training mode only, as nerfacc).

        occ_eval_fn(x [M,3] world points) -> [M] opacity-like values (e.g. density * step size).
        Warm-up (step < warmup_steps): every visible cell; after: 1/4 uniform + up to 1/4 occupied.
        """
        if not self.training:
            raise RuntimeError("OccupancyGrid.update_every_n_steps is for training; call update() directly at inference")
        if step % n == 0:
            self.update(step, occ_eval_fn, occ_thre, ema_decay, warmup_steps)

    @torch.no_grad()
    def mark_invisible_cells(self, K: Tensor, c2w: Tensor, width: int, height: int, near_plane: float = 0.0,
                             chunk: int = 32**3) -> None:
        """Set occ = -1 for cells seen by no camera or in front of any camera's near plane (nerfacc).

        K [C,3,3] or [1,3,3], c2w [C,3,4] / [C,4,4] OpenCV camera-to-world. Call once before training.
        """
        K = K.to(self.aabbs)
        c2w = c2w.to(self.aabbs)
        w2c_r = c2w[:, :3, :3].transpose(1, 2)
        w2c_t = -w2c_r @ c2w[:, :3, 3:]
        res = self.resolution
        for lvl, indices in enumerate(self._all_cells()):
            lo, hi = self.aabbs[lvl, :3], self.aabbs[lvl, 3:]
            for idx in indices.split(chunk):
                # cell corners mapped to [0, 1] by res - 1, as nerfacc does
                x = self._cell_coords(idx).to(lo.dtype) / max(res - 1, 1)
                xyz_c = w2c_r @ (lo + x * (hi - lo)).T + w2c_t  # [C,3,M]
                uvd = K @ xyz_c
                uv = uvd[:, :2] / uvd[:, 2:]
                in_image = (uvd[:, 2] >= 0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
                covered = ((uvd[:, 2] >= near_plane) & in_image).any(0)
                too_near = ((uvd[:, 2] < near_plane) & in_image).any(0)
                self.occs[lvl * self.cells_per_lvl + idx] = torch.where(covered & ~too_near, 0.0, -1.0).to(self.occs.dtype)
