"""Pure-PyTorch multiresolution hash-grid encoding with tiny-cuda-nn's exact semantics.

Reference twin of the tcnn and native backends (same signature, same parameter layout; see
config.py for the layout). Runs on any device and dtype (float64 for gradcheck).

Memory: one level at a time, the forward keeps only (x, params); the backward recomputes the
corner indices, so a batch costs O(N * 8) temporaries rather than O(N * L * 8).
The backward is written with differentiable torch ops, so double backward works too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnefes.ops.hashgrid.config import GridLevel, HashGridConfig

_MASK32 = 0xFFFFFFFF
# tcnn's coherent prime hash: the first coordinate's factor is 1 (keeps x-neighbours coherent).
_PRIMES = (1, 2654435761, 805459861)
# Bit d of corner index c selects +1 along axis d.
_CORNER_BITS = [[(c >> d) & 1 for c in range(8)] for d in range(3)]  # [3][8]


def _mul_u32(a: Tensor, factor: int) -> Tensor:
    """(a * factor) mod 2^32 for int64 a in [0, 2^32), without int64 overflow."""
    if factor == 1:
        return a
    lo, hi = factor & 0xFFFF, factor >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def _level_positions(x: Tensor, level: GridLevel) -> tuple[Tensor, Tensor]:
    """x [N,3] -> (cell [N,3] int64 as uint32, frac [N,3] in x's dtype).

    tcnn computes fmaf(scale, x, 0.5f) in float32; doing the product in float64 and rounding
    once reproduces the fused multiply-add.
    """
    pos = (x.double() * level.scale + 0.5).to(x.dtype)
    cell = torch.floor(pos.detach())
    frac = pos - cell
    return cell.long() & _MASK32, frac


def _corner_indices(cell: Tensor, level: GridLevel) -> Tensor:
    """cell [N,3] (uint32 values in int64) -> table indices [N,8] of the level's 8 corners."""
    per_axis = [torch.stack([cell[:, d], (cell[:, d] + 1) & _MASK32], dim=1) for d in range(3)]  # 3 x [N,2]
    bits = [torch.tensor(b, device=cell.device) for b in _CORNER_BITS]
    if level.dense:
        res = level.resolution
        terms = [per_axis[0], per_axis[1] * res, per_axis[2] * (res * res)]
        index = (terms[0][:, bits[0]] + terms[1][:, bits[1]] + terms[2][:, bits[2]]) & _MASK32
    else:
        terms = [_mul_u32(per_axis[d], _PRIMES[d]) for d in range(3)]
        index = terms[0][:, bits[0]] ^ terms[1][:, bits[1]] ^ terms[2][:, bits[2]]
    return torch.remainder(index, level.size)


def _axis_factors(frac: Tensor) -> list[Tensor]:
    """frac [N,3] -> per axis the corner factors [N,8]: (1 - frac_d) or frac_d by bit d."""
    out = []
    for d in range(3):
        pair = torch.stack([1.0 - frac[:, d], frac[:, d]], dim=1)  # [N,2]
        out.append(pair[:, torch.tensor(_CORNER_BITS[d], device=frac.device)])
    return out


def _weights(factors: list[Tensor]) -> Tensor:
    return factors[0] * factors[1] * factors[2]


def _weight_derivatives(factors: list[Tensor]) -> list[Tensor]:
    """d w_c / d frac_d [N,8] per axis d: the other two axes' factors, signed by bit d."""
    out = []
    for d in range(3):
        sign = torch.tensor([1.0 if b else -1.0 for b in _CORNER_BITS[d]], device=factors[0].device, dtype=factors[0].dtype)
        others = [factors[e] for e in range(3) if e != d]
        out.append(others[0] * others[1] * sign)
    return out


def _encode_forward(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    n_feat = cfg.n_features_per_level
    table = params.view(-1, n_feat)
    out_dtype = torch.promote_types(x.dtype, params.dtype)
    out = torch.empty(x.shape[0], cfg.n_output_dims, dtype=out_dtype, device=x.device)
    for lv_i, level in enumerate(cfg.levels()):
        cell, frac = _level_positions(x, level)
        index = _corner_indices(cell, level)  # [N,8]
        values = table[level.offset:level.offset + level.size].index_select(0, index.view(-1)).view(-1, 8, n_feat)
        weights = _weights(_axis_factors(frac)).to(out_dtype)
        out[:, lv_i * n_feat:(lv_i + 1) * n_feat] = (weights.unsqueeze(-1) * values).sum(1)
    return out


def _encode_backward(grad_out: Tensor, x: Tensor, params: Tensor, cfg: HashGridConfig,
                     need_x: bool, need_params: bool) -> tuple[Tensor | None, Tensor | None]:
    n_feat = cfg.n_features_per_level
    table = params.view(-1, n_feat)
    grad_table = torch.zeros_like(table) if need_params else None
    grad_x = torch.zeros_like(x) if need_x else None
    for lv_i, level in enumerate(cfg.levels()):
        cell, frac = _level_positions(x, level)
        index = _corner_indices(cell, level)
        factors = _axis_factors(frac)
        g = grad_out[:, lv_i * n_feat:(lv_i + 1) * n_feat].to(table.dtype)  # [N,F]
        if need_params:
            weights = _weights(factors).to(table.dtype)
            contrib = (weights.unsqueeze(-1) * g.unsqueeze(1)).view(-1, n_feat)  # [N*8,F]
            grad_table[level.offset:level.offset + level.size].index_add_(0, index.view(-1), contrib)
        if need_x:
            values = table[level.offset:level.offset + level.size].index_select(0, index.view(-1)).view(-1, 8, n_feat)
            dl_dw = (values * g.unsqueeze(1)).sum(-1).to(x.dtype)  # [N,8]
            dfrac = torch.stack([(dl_dw * dw).sum(1) for dw in _weight_derivatives(factors)], dim=1)  # [N,3]
            grad_x = grad_x + dfrac * level.scale
    return grad_x, (grad_table.view(-1) if need_params else None)


class _HashGridEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, params)
        ctx.cfg = cfg
        return _encode_forward(x, params, cfg)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, params = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_params = _encode_backward(grad_out, x, params, ctx.cfg, need_x, need_params)
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
