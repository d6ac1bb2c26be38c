"""Autograd wrappers of the native kernels (csrc/), with the pure-torch twins' signatures.

`composite_native` matches `fastnefes.ops.composite.composite_torch` and `hash_grid_encode_native`
matches `fastnefes.ops.hashgrid.hash_grid_encode_torch` (the march is in
fastnefes.ops.occgrid._native); where the native module cannot be built or loaded (see
fastnefes.ops._backend) each runs its twin, after one warning.

Dtypes: compositing runs in the promoted dtype of its float inputs (float32 / float64 on CPU, plus
float16 / bfloat16 storage on CUDA with float accumulation; CPU half inputs are computed in
float32). The hash grid runs in float32 or float64; on CUDA its table may also be float16
(accumulated in float32), see `_grid_dtypes`.
"""

from __future__ import annotations

from dataclasses import astuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastnefes.ops._backend import load_native
from fastnefes.ops.composite._torch_impl import (TRANSMITTANCE_THRESHOLD, CompositeOutput, check_packed_inputs,
                                                  composite_torch)
from fastnefes.ops.hashgrid._torch_impl import hash_grid_encode_torch
from fastnefes.ops.hashgrid.config import HashGridConfig

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _stream(t: Tensor) -> int:
    """The current CUDA stream handle for t's device (0 = unused on CPU)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _opt_contiguous(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigmas: Tensor, rgbs: Tensor, features: Tensor | None, t_starts: Tensor, t_ends: Tensor,
                ranges: Tensor, threshold: float, detach_feature_weights: bool, module) -> tuple:  # type: ignore[override]
        rgb, feat, depth, opacity = module.composite_forward(ranges, sigmas, rgbs, features, t_starts, t_ends,
                                                             threshold, _stream(sigmas))
        ctx.save_for_backward(sigmas, rgbs, features, t_starts, t_ends, ranges, rgb, feat, depth, opacity)
        ctx.threshold, ctx.detach, ctx.module = threshold, detach_feature_weights, module
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: the kernel reads them as zero
        return rgb, feat, depth, opacity

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rgb: Tensor | None, g_feat: Tensor | None, g_depth: Tensor | None,
                 g_opacity: Tensor | None) -> tuple:  # type: ignore[override]
        sigmas, rgbs, features, t_starts, t_ends, ranges, rgb, feat, depth, opacity = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:5]]
        grads = ctx.module.composite_backward(
            ranges, sigmas, rgbs, features, t_starts, t_ends, ctx.threshold, ctx.detach, rgb, feat, depth, opacity,
            *(_opt_contiguous(g, sigmas.dtype) for g in (g_rgb, g_feat, g_depth, g_opacity)), needs, _stream(sigmas))
        return (*grads, None, None, None, None)


def composite_native(sigmas: Tensor, rgbs: Tensor, features: Tensor | None, t_starts: Tensor, t_ends: Tensor,
                     ray_indices: Tensor, n_rays: int, detach_feature_weights: bool = True,
                     transmittance_threshold: float = TRANSMITTANCE_THRESHOLD) -> CompositeOutput:
    """Fused compositing of packed samples; shapes and semantics as `composite_torch`.

    Args:
        sigmas: [N] densities (>= 0); rgbs: [N,3]; features: [N,D] or None.
        t_starts, t_ends: [N] sample intervals (t_end >= t_start).
        ray_indices: [N] int, sorted ascending; n_rays: R (rays without samples give zeros).
        detach_feature_weights: features use w.detach().
        transmittance_threshold: a ray stops at its first sample with T_j below it (0 disables).
    Returns:
        CompositeOutput(rgb [R,3], features [R,D] | None, depth [R], opacity [R]).
    """
    module = load_native(sigmas.device.type)
    if module is None:
        return composite_torch(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays,
                               detach_feature_weights, transmittance_threshold)
    if sigmas.is_cuda:  # the CUDA ray-range kernel trusts the order: check it here (syncs)
        check_packed_inputs(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays)
    elif ray_indices.dtype not in (torch.int64, torch.int32) or ray_indices.shape != sigmas.shape[:1]:
        # On CPU the kernel checks shapes, order and range itself (ValueError), in one pass.
        raise ValueError(f"composite: ray_indices must be an integer [{sigmas.shape[0]}] tensor, "
                         f"got {ray_indices.dtype} {tuple(ray_indices.shape)}")
    floats = [t for t in (sigmas, rgbs, features, t_starts, t_ends) if t is not None]
    dtype = floats[0].dtype
    for t in floats[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    compute = dtype if dtype in (_CUDA_DTYPES if sigmas.is_cuda else _CPU_DTYPES) else torch.float32
    empty_features = features is not None and features.shape[1] == 0
    ranges = module.ray_ranges(ray_indices.long().contiguous(), int(n_rays), _stream(sigmas))
    rgb, feat, depth, opacity = _Composite.apply(
        sigmas.to(compute).contiguous(), rgbs.to(compute).contiguous(),
        None if empty_features else _opt_contiguous(features, compute), t_starts.to(compute).contiguous(),
        t_ends.to(compute).contiguous(), ranges, float(transmittance_threshold), bool(detach_feature_weights), module)
    if empty_features:
        feat = features.new_zeros(int(n_rays), 0)
    return CompositeOutput(rgb=rgb.to(dtype), features=None if feat is None else feat.to(dtype),
                           depth=depth.to(dtype), opacity=opacity.to(dtype))


# Packed level records per (config, device): (CPU copy for the shape checks, copy on the device).
_LEVELS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _levels_of(cfg: HashGridConfig, module, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (astuple(cfg), str(device))
    levels = _LEVELS.get(key)
    if levels is None:
        host = module.pack_levels([(lv.scale, lv.resolution, lv.size, lv.offset, lv.dense) for lv in cfg.levels()])
        levels = _LEVELS[key] = (host, host.to(device))
    return levels


def _grid_dtypes(x: Tensor, params: Tensor) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(positions, parameters, output) dtypes the kernels run with for these inputs.

    CPU: float32 or float64 throughout. CUDA: float64 throughout, or float32 positions with float32
    or float16 parameters (float16 output when both inputs are half, as tcnn's half grid).
    """
    dtype = torch.promote_types(x.dtype, params.dtype)
    if dtype == torch.float64:
        return dtype, dtype, dtype
    if not x.is_cuda:
        return torch.float32, torch.float32, torch.float32
    p_dtype = params.dtype if params.dtype in (torch.float32, torch.float16) else torch.float32
    return torch.float32, p_dtype, torch.float16 if dtype == torch.float16 else torch.float32


class _HashGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, levels: tuple[Tensor, Tensor], n_features: int,
                out_dtype: torch.dtype, module) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, params)
        ctx.levels, ctx.n_features, ctx.out_dtype, ctx.module = levels, n_features, out_dtype, module
        return module.hashgrid_forward(x, params, *levels, n_features, out_dtype, _stream(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple:  # type: ignore[override]
        x, params = ctx.saved_tensors
        grad_x, grad_params = ctx.module.hashgrid_backward(
            x, params, *ctx.levels, ctx.n_features, grad_out.to(ctx.out_dtype).contiguous(),
            bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), _stream(x))
        if grad_params is not None:
            grad_params = grad_params.to(params.dtype)  # float32 accumulation for half tables
        return grad_x, grad_params, None, None, None, None


def hash_grid_encode_native(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Hash-grid encoding on CPU or CUDA; shapes and semantics as `hash_grid_encode_torch`.

    Args:
        x: [N, 3] positions, expected in [0, 1] (not clamped).
        params: [cfg.n_params] flat table, tcnn layout.
    Returns:
        [N, L*F] (dtype of x and params promoted); differentiable w.r.t. x and params.
    """
    module = load_native(x.device.type)
    if module is None:
        return hash_grid_encode_torch(x, params, cfg)
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"hash grid: x must be [N, 3], got {tuple(x.shape)}")
    if params.dim() != 1 or params.shape[0] != cfg.n_params:
        raise ValueError(f"hash grid: params must be [{cfg.n_params}], got {tuple(params.shape)}")
    if params.device != x.device:
        raise ValueError(f"hash grid: x on {x.device}, params on {params.device}")
    x_dtype, p_dtype, out_dtype = _grid_dtypes(x, params)
    out = _HashGrid.apply(x.to(x_dtype).contiguous(), params.to(p_dtype).contiguous(),
                          _levels_of(cfg, module, x.device), cfg.n_features_per_level, out_dtype, module)
    return out.to(torch.promote_types(x.dtype, params.dtype))
