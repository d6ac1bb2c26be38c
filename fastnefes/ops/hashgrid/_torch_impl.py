"""Pure-PyTorch multiresolution hash-grid encoding with tiny-cuda-nn's exact semantics.

Reference twin of the tcnn and native backends (same signature, same parameter layout; see
config.py for the layout). Runs on any device and dtype (float64 for gradcheck).

Memory: levels are processed one at a time; for the backward the forward keeps only the corner
indices (int32, 32 bytes per point and level), not the gathered values or weights. The backward
is written with differentiable torch ops, so double backward works too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnefes.ops.hashgrid.config import GridLevel, HashGridConfig

_MASK32 = 0xFFFFFFFF
# tcnn's coherent prime hash: the first coordinate's factor is 1 (keeps x-neighbours coherent).
_PRIMES = (1, 2654435761, 805459861)
# Corner c = x_bit + 2 y_bit + 4 z_bit (bit d = +1 along axis d). Tensors are corner-major
# ([8, N], N innermost, ~10x faster broadcasting on CPU than [N, 8]): per-axis pairs [2, N]
# broadcast to [2(z), 2(y), 2(x), N], which flattens in exactly this corner order.
_AXIS_VIEWS = ((1, 1, 2, -1), (1, 2, 1, -1), (2, 1, 1, -1))


def _mul_u32(a: Tensor, factor: int) -> Tensor:
    """(a * factor) mod 2^32 for int64 a in [0, 2^32), without int64 overflow."""
    if factor == 1:
        return a
    lo, hi = factor & 0xFFFF, factor >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def _level_positions(x_t: Tensor, level: GridLevel) -> tuple[Tensor, Tensor]:
    """x_t [3,N] -> (cell [3,N] int64 holding tcnn's uint32 cell, frac [3,N] in x's dtype).

    tcnn computes fmaf(scale, x, 0.5f) in float32; doing the product in float64 and rounding
    once reproduces the fused multiply-add.
    """
    pos = (x_t.double() * level.scale + 0.5).to(x_t.dtype)
    cell = torch.floor(pos.detach())
    return cell.long() & _MASK32, pos - cell


def _corner_indices(cell: Tensor, level: GridLevel) -> Tensor:
    """cell [3,N] -> table indices [8,N] of the level's 8 corners (tcnn grid_index)."""
    pairs = [torch.stack([cell[d], (cell[d] + 1) & _MASK32]) for d in range(3)]  # 3 x [2,N]
    if level.dense:
        res = level.resolution
        index = (pairs[0].view(_AXIS_VIEWS[0]) + (pairs[1] * res).view(_AXIS_VIEWS[1])
                 + (pairs[2] * (res * res)).view(_AXIS_VIEWS[2])) & _MASK32
        return torch.remainder(index.view(8, -1), level.size)
    index = (_mul_u32(pairs[0], _PRIMES[0]).view(_AXIS_VIEWS[0]) ^ _mul_u32(pairs[1], _PRIMES[1]).view(_AXIS_VIEWS[1])
             ^ _mul_u32(pairs[2], _PRIMES[2]).view(_AXIS_VIEWS[2]))
    # hashed levels always hold the full 2^log2 table (config), so the modulo is a mask
    return (index & (level.size - 1)).view(8, -1)


def _weights_and_derivatives(frac: Tensor, with_derivatives: bool) -> tuple[Tensor, list[Tensor]]:
    """frac [3,N] -> trilinear weights [8,N] and, optionally, d w / d frac_d [8,N] for d = 0..2."""
    pairs = [torch.stack([1.0 - frac[d], frac[d]]).view(_AXIS_VIEWS[d]) for d in range(3)]
    weights = (pairs[0] * pairs[1] * pairs[2]).reshape(8, -1)
    if not with_derivatives:
        return weights, []
    sign = [torch.tensor([-1.0, 1.0], dtype=frac.dtype, device=frac.device).view(_AXIS_VIEWS[d][:3] + (1,))
            for d in range(3)]
    derivs = [(sign[0] * pairs[1] * pairs[2]).reshape(8, -1), (pairs[0] * sign[1] * pairs[2]).reshape(8, -1),
              (pairs[0] * pairs[1] * sign[2]).reshape(8, -1)]
    return weights, derivs


def _encode_forward(x: Tensor, params: Tensor, cfg: HashGridConfig, keep_indices: bool) -> tuple[Tensor, list[Tensor]]:
    n_feat = cfg.n_features_per_level
    table = params.view(-1, n_feat)
    out_dtype = torch.promote_types(x.dtype, params.dtype)
    out = torch.empty(x.shape[0], cfg.n_levels, n_feat, dtype=out_dtype, device=x.device)
    x_t = x.t()
    kept = []
    for lv_i, level in enumerate(cfg.levels()):
        cell, frac = _level_positions(x_t, level)
        index = _corner_indices(cell, level).view(-1)  # [8N]
        values = table[level.offset:level.offset + level.size].index_select(0, index).view(8, -1, n_feat)
        weights = _weights_and_derivatives(frac, False)[0].to(out_dtype)
        out[:, lv_i] = (weights.unsqueeze(-1) * values).sum(0)
        if keep_indices:
            kept.append(index.to(torch.int32) if level.size < 2**31 else index)
    return out.view(x.shape[0], cfg.n_output_dims), kept


def _encode_backward(grad_out: Tensor, x: Tensor, params: Tensor, cfg: HashGridConfig, indices: list[Tensor],
                     need_x: bool, need_params: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients from the forward's corner indices; frac is recomputed from x so that double
    backward (create_graph) differentiates through it."""
    n_feat = cfg.n_features_per_level
    table = params.view(-1, n_feat)
    grad_table = torch.zeros_like(table) if need_params else None
    grad_x_t = torch.zeros_like(x.t()) if need_x else None
    x_t = x.t()
    grad_out = grad_out.reshape(x.shape[0], cfg.n_levels, n_feat)
    for lv_i, level in enumerate(cfg.levels()):
        frac = _level_positions(x_t, level)[1]
        index = indices[lv_i].long()  # int64: index_add_ is much slower with int32 indices on CPU
        weights, derivs = _weights_and_derivatives(frac, need_x)
        g = grad_out[:, lv_i].to(table.dtype).unsqueeze(0)  # [1,N,F]
        if need_params:
            contrib = (weights.to(table.dtype).unsqueeze(-1) * g).view(-1, n_feat)  # [8N,F]
            grad_table[level.offset:level.offset + level.size].index_add_(0, index, contrib)
        if need_x:
            values = table[level.offset:level.offset + level.size].index_select(0, index).view(8, -1, n_feat)
            dl_dw = (values * g).sum(-1).to(x.dtype)  # [8,N]
            dfrac = torch.stack([(dl_dw * dw).sum(0) for dw in derivs])  # [3,N]
            grad_x_t = grad_x_t + dfrac * level.scale
    return (grad_x_t.t() if need_x else None), (grad_table.view(-1) if need_params else None)


class _HashGridEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:  # type: ignore[override]
        keep = any(ctx.needs_input_grad[:2])
        out, indices = _encode_forward(x, params, cfg, keep_indices=keep)
        ctx.save_for_backward(x, params, *indices)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, params, *indices = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_params = _encode_backward(grad_out, x, params, ctx.cfg, indices, need_x, need_params)
        return grad_x, grad_params, None


def hash_grid_encode_torch(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Encode positions with the multiresolution hash grid.

    Args:
        x: [N, 3] positions, expected in [0, 1] (not clamped, as in tcnn).
        params: [cfg.n_params] flat table, tcnn layout.
        cfg: the grid configuration.
    Returns:
        [N, L*F] features (dtype of x/params promoted), column = level * F + f.
        Differentiable w.r.t. params and x (trilinear weights; the cell choice is piecewise constant).
    """
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"hash grid: x must be [N, 3], got {tuple(x.shape)}")
    if params.dim() != 1 or params.shape[0] != cfg.n_params:
        raise ValueError(f"hash grid: params must be [{cfg.n_params}], got {tuple(params.shape)}")
    return _HashGridEncode.apply(x.contiguous(), params.contiguous(), cfg)
