"""nerfacc backend of the occupancy-grid marching (CUDA only).

Importing this module registers the ("occgrid", "nerfacc") probe. Sampling delegates to nerfacc's
OccGridEstimator.sampling on OUR buffers (aabbs, occs, binaries have nerfacc's shapes and layout),
so the grid state is shared: updates are done by OccupancyGrid itself (same algorithm as nerfacc).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from fastnefes.ops import backends

try:  # nerfacc may be absent or broken; any failure means "not available"
    from nerfacc.estimators.occ_grid import OccGridEstimator as _OccGridEstimator

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001
    _OccGridEstimator = None
    _IMPORT_ERROR = f"nerfacc not importable ({type(exc).__name__}: {exc})".replace("\n", " ")


@functools.lru_cache(maxsize=None)
def _extension_error() -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "CUDA not available"
    try:
        from nerfacc.cuda._backend import _C  # builds or loads nerfacc's CUDA extension
    except Exception as exc:  # noqa: BLE001
        return f"nerfacc CUDA extension failed to load ({type(exc).__name__}: {exc})".replace("\n", " ")
    return None if _C is not None else "nerfacc CUDA extension not built"


def _probe(device_type: str) -> str | None:
    if device_type != "cuda":
        return "nerfacc runs on CUDA only"
    return _extension_error()


backends.register_probe("occgrid", "nerfacc", _probe)


def sampling_nerfacc(grid, rays_o: Tensor, rays_d: Tensor, sigma_fn: Callable | None, alpha_fn: Callable | None,
                     near_plane: float, far_plane: float, t_min: Tensor | None, t_max: Tensor | None,
                     render_step_size: float, early_stop_eps: float, alpha_thre: float, stratified: bool,
                     cone_angle: float) -> tuple[Tensor, Tensor, Tensor]:
    """OccGridEstimator.sampling run on `grid`'s buffers (an OccupancyGrid on CUDA)."""
    if _OccGridEstimator is None:
        raise RuntimeError(_IMPORT_ERROR or "nerfacc unavailable")
    # sampling() reads only self.binaries, self.aabbs and self.occs, which OccupancyGrid holds
    # with nerfacc's shapes, so the estimator's method runs directly on our module.
    ray_indices, t_starts, t_ends = _OccGridEstimator.sampling(
        grid, rays_o.contiguous(), rays_d.contiguous(), sigma_fn=sigma_fn, alpha_fn=alpha_fn,
        near_plane=near_plane, far_plane=far_plane, t_min=t_min, t_max=t_max, render_step_size=render_step_size,
        early_stop_eps=early_stop_eps, alpha_thre=alpha_thre, stratified=stratified, cone_angle=cone_angle)
    return ray_indices.long(), t_starts, t_ends
