"""Native occupancy-grid march (csrc/occgrid_kernel.h, CPU and CUDA launchers of one body): the
twin of `_torch_impl.march_rays`, same signature and the same samples.

Empty space is skipped a block at a time using coarser "mips" of the binary grid (a block of
2^m x 2^m x 2^m cells is free to skip when no occupied cell lies in it or within one cell of it
and it keeps one cell clear of the level boxes' borders; csrc/occgrid_kernel.h); `OccupancyGrid`
computes them once per change of its binaries and passes them in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnefes.ops._backend import load_native
from fastnefes.ops.occgrid._torch_impl import march_rays

_DTYPES = (torch.float32, torch.float64)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def occupancy_mips(binaries: Tensor, aabbs: Tensor) -> Tensor | None:
    """binaries [L,res,res,res] bool, aabbs [L,6] -> the packed mips (uint8) the native march skips
    with, or None when the native kernels are unavailable on binaries' device."""
    module = load_native(binaries.device.type)
    if module is None:
        return None
    return module.occgrid_mips(binaries.contiguous(), aabbs.to(torch.float32).contiguous(), _stream(binaries))


def march_rays_native(rays_o: Tensor, rays_d: Tensor, binaries: Tensor, aabbs: Tensor, near: Tensor, far: Tensor,
                      step: float, cone_angle: float = 0.0, mips: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Occupied march samples of all rays; arguments and results as `march_rays`.

    Args:
        rays_o, rays_d: [R,3]; near, far: [R] per-ray march range (the march is anchored at near).
        binaries: [L,res,res,res] bool; aabbs: [L,6]; mips: `occupancy_mips(binaries, aabbs)` if at hand.
    Returns:
        ray_indices [N] long (sorted), t_starts [N], t_ends [N] (rays_o's dtype).
    """
    module = load_native(rays_o.device.type)
    if module is None or rays_o.dtype not in _DTYPES:
        return march_rays(rays_o, rays_d, binaries, aabbs, near, far, step, cone_angle)
    dtype = rays_o.dtype
    binaries = binaries.contiguous()
    if mips is None:
        mips = module.occgrid_mips(binaries, aabbs.to(torch.float32).contiguous(), _stream(rays_o))
    return module.occgrid_march(rays_o.contiguous(), rays_d.to(dtype).contiguous(), near.to(dtype).contiguous(),
                                far.to(dtype).contiguous(), binaries, mips, aabbs.to(dtype).contiguous(),
                                float(step), float(cone_angle), _stream(rays_o))
