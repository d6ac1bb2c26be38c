"""Field outputs with their exact derivatives with respect to the sample position (forward mode).

Gauss-Newton on a rendered signal needs every pixel's Jacobian with respect to the 6 pose
coordinates. Reverse mode gets it one output channel per backward pass (19 passes for 16
features and RGB). But the pose reaches the field only through each sample's position (3
numbers) and its ray's direction (3 more, for the view-dependent colour), so pushing those few
tangents forward through the field gives every channel's derivative in one pass: the hash
grid's trilinear interpolation has a closed-form derivative, and the heads are Linear / ReLU
stacks whose tangents go through the same matrices. Only the hash architecture has this form
(`supports`); fastnefes.refine.pose_jacobian falls back to reverse mode for the others.

Tangents are stacked in their own dimension: [N, T, C] for per-sample vectors (T tangents).
"""

from __future__ import annotations

from dataclasses import astuple
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnefes.field.heads import spherical_harmonics
from fastnefes.field.space import contract_to_grid
from fastnefes.ops.hashgrid.config import HashGridConfig
from fastnefes.ops.hashgrid._torch_impl import _MASK32, _PRIMES, _mul_u32


def hash_grid_jacobian(x: Tensor, params: Tensor, cfg: HashGridConfig) -> tuple[Tensor, Tensor]:
    """The hash-grid encoding and its derivative with respect to the position.

    All levels at once (tens of tensor ops, not tens per level: on a CPU the single-query path
    is bound by the number of ops), with the backends' semantics (config.py's notes): float32
    positions scale * x + 0.5, dense levels indexed x + y res + z res^2, hashed ones by the
    coherent prime hash, trilinear weights over the 8 corners.

    Args:
        x: [N, 3] positions in the unit cube; params: [cfg.n_params] flat table (tcnn layout).
    Returns:
        encoding [N, L*F] (as fastnefes.ops.hashgrid.hash_grid_encode) and d encoding / d x
        [N, 3, L*F] (row d: the derivative along axis d).
    """
    key = (astuple(cfg), x.device)
    consts = _GRID_CONSTANTS.get(key)
    if consts is None:
        levels = cfg.levels()
        consts = _GRID_CONSTANTS[key] = (
            torch.tensor([lv.scale for lv in levels], dtype=torch.float64, device=x.device).view(-1, 1, 1),
            torch.tensor([lv.resolution for lv in levels], device=x.device).view(-1, 1, 1),
            torch.tensor([lv.size for lv in levels], device=x.device).view(-1, 1, 1),
            torch.tensor([lv.offset for lv in levels], device=x.device).view(-1, 1, 1),
            torch.tensor([lv.dense for lv in levels], device=x.device).view(-1, 1, 1),
            torch.tensor([[(c >> d) & 1 for d in range(3)] for c in range(8)], device=x.device),  # [8, 3] corner bits
        )
    scale, res, size, offset, dense, bits = consts
    n_feat = cfg.n_features_per_level
    L, N = scale.shape[0], x.shape[0]
    pos = (x.double().t()[None] * scale + 0.5).to(x.dtype)  # [L, 3, N], tcnn's fmaf in float32
    cell = torch.floor(pos)
    frac = pos - cell
    corner = (cell.long()[:, None] + bits[None, :, :, None]) & _MASK32  # [L, 8, 3, N]
    cx, cy, cz = corner.unbind(2)
    linear = (cx + cy * res + cz * res * res) & _MASK32
    hashed = cx ^ _mul_u32(cy, _PRIMES[1]) ^ _mul_u32(cz, _PRIMES[2])
    index = torch.remainder(torch.where(dense, linear, hashed), size) + offset  # [L, 8, N]
    values = params.view(-1, n_feat).index_select(0, index.reshape(-1)).view(L, 8, N, n_feat)
    side = bits.t()[None, :, :, None].to(frac.dtype)  # [1, 3, 8, 1]
    factors = side * frac[:, :, None] + (1 - side) * (1 - frac[:, :, None])  # [L, 3, 8, N]
    slopes = (2 * side - 1).expand_as(factors)
    f0, f1, f2 = factors.unbind(1)
    weights = torch.stack([f0 * f1 * f2, slopes[:, 0] * f1 * f2, f0 * slopes[:, 1] * f2, f0 * f1 * slopes[:, 2]], 1)
    both = torch.einsum("lkcn,lcnf->nlkf", weights.to(values.dtype), values)  # [N, L, 4, F]
    enc = both[:, :, 0].reshape(N, L * n_feat)
    jac = (both[:, :, 1:] * scale.view(1, L, 1, 1).to(values.dtype)).transpose(1, 2).reshape(N, 3, L * n_feat)
    return enc, jac


_GRID_CONSTANTS: dict = {}


def sequential_jvp(net: nn.Sequential, x: Tensor, tangents: Tensor, tangent_dim: int) -> tuple[Tensor, Tensor]:
    """net(x) and its Jacobian applied to each tangent, for nets of Linear / Conv2d / ReLU /
    BatchNorm2d (eval) layers.

    Args:
        x: the input ([N, C] for Linear stacks, [B, C, h, w] for convolutions).
        tangents: x's shape with a tangent dimension inserted at tangent_dim ([N, T, C] or
            [T, B, C, h, w]).
    Returns:
        (net(x), tangents through the net, same layout).
    """
    for layer in net:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight, layer.bias)
            tangents = F.linear(tangents, layer.weight)
        elif isinstance(layer, nn.ReLU):
            mask = (x > 0).unsqueeze(tangent_dim)
            x = torch.relu(x)
            tangents = tangents * mask
        elif isinstance(layer, nn.Conv2d):
            x = layer(x)
            flat = tangents.flatten(0, 1)
            flat = F.conv2d(flat, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            tangents = flat.view(*tangents.shape[:2], *flat.shape[1:])
        elif isinstance(layer, nn.BatchNorm2d) and not layer.training:
            x = layer(x)
            gain = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            tangents = tangents * gain.view(-1, 1, 1)
        else:
            raise TypeError(f"sequential_jvp: no tangent rule for {type(layer).__name__}")
    return x, tangents


def supports(model) -> bool:
    """Whether `field_with_jacobian` handles this model (the hash architecture's Linear heads)."""
    from fastnefes.field.geometry import GeometryField

    if model.config.arch != "hash" or not isinstance(model.geometry, GeometryField):
        return False
    heads = (model.geometry.mlp, model.feature.mlp, model.color.mlp)
    return all(isinstance(m, (nn.Linear, nn.ReLU)) for net in heads for m in net)


class FieldSamples(NamedTuple):
    """Per-sample field outputs and their tangents (N samples)."""

    density: Tensor  # [N]
    d_density: Tensor  # [N, 3] d density / d position
    rgb: Optional[Tensor]  # [N, 3]
    d_rgb: Optional[Tensor]  # [N, 6, 3]: 3 position tangents, then 3 ray-direction tangents
    features: Optional[Tensor]  # [N, D]
    d_features: Optional[Tensor]  # [N, 3, D] d features / d position


# Monomials x^a y^b z^c up to degree 3 (every spherical-harmonics term of degree <= 4 is a
# polynomial of degree <= 3 in the direction's components, as heads.spherical_harmonics writes it).
_EXPONENTS = [(a, b, c) for a in range(4) for b in range(4) for c in range(4) if a + b + c <= 3]
_SH_CACHE: dict = {}


def _sh_constants(degree: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(exponents of each monomial's derivative along each axis [3, M, 3] long, the factors that
    come down [3, M], coefficients of the terms in the monomials [M, degree^2]). The coefficients
    are solved once from random points of R^3 (not the sphere, where x^2 + y^2 + z^2 = 1 makes
    them ambiguous), in float64: exact to rounding."""
    key = (degree, str(device))
    if key not in _SH_CACHE:
        E = torch.tensor(_EXPONENTS, dtype=torch.float64)  # [M, 3]
        points = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        monomials = (points[:, None, :] ** E[None]).prod(-1)  # [256, M]
        coeffs = torch.linalg.lstsq(monomials, spherical_harmonics(points, degree)).solution  # [M, S]
        down = E.t().clone()  # [3, M]: d/dx_j brings down the exponent of x_j
        lowered = (E[None] - torch.eye(3, dtype=torch.float64)[:, None, :]).clamp_min(0).long()  # [3, M, 3]
        _SH_CACHE[key] = (lowered.to(device), down.float().to(device), coeffs.float().to(device))
    return _SH_CACHE[key]


def spherical_harmonics_jacobian(dirs: Tensor, degree: int = 4) -> Tensor:
    """d spherical_harmonics(dirs, degree) / d dirs: [R, 3] -> [R, 3, degree^2] (row d: the
    derivative along component d), through the terms' monomials: a handful of tensor ops
    (torch's forward-mode transforms would import hundreds of modules on first use)."""
    lowered, down, coeffs = _sh_constants(degree, dirs.device)
    powers = dirs[..., None] ** torch.arange(4, device=dirs.device, dtype=dirs.dtype)  # [R, 3 axes, 4]
    axes = torch.arange(3, device=dirs.device)
    d_monomials = powers[:, axes, lowered].prod(-1) * down.to(dirs.dtype)  # [R, 3, M]
    return d_monomials @ coeffs.to(dirs.dtype)


def contraction_jacobian(x: Tensor) -> Tensor:
    """d contract_to_grid / d x at x [N, 3] -> [N, 3 (grid), 3 (x)] (closed form)."""
    y = 2.0 * x - 1.0
    m, k = y.abs().max(-1, keepdim=True)
    outside = m > 1.0
    safe = torch.where(outside, m, torch.ones_like(m))
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    # Outside: c = (2 / m - 1 / m^2) y, m = |y_k| (the largest component).
    d_m = torch.zeros_like(y).scatter_(-1, k, torch.sign(y.gather(-1, k)))  # d m / d y [N, 3]
    outer = (2.0 / safe - 1.0 / safe**2)[..., None] * eye + y[:, :, None] * ((2.0 / safe**3 - 2.0 / safe**2)[..., None] * d_m[:, None, :])
    return 0.5 * torch.where(outside[..., None], outer, eye.expand_as(outer))  # grid = (c + 2) / 4, y = 2 x - 1


def field_with_jacobian(model, x: Tensor, dirs: Tensor, ray_indices: Tensor, with_rgb: bool = True,
                        with_features: bool = True) -> FieldSamples:
    """Density, static colour and features of the hash field at x [N, 3] (unit cube), with their
    derivatives: position tangents for all, and ray-direction tangents for the colour.

    dirs: [R, 3] unit ray directions (world); ray_indices: [N] long, each sample's ray.
    The values equal the model's own forward (GeometryField, ColorHead, FeatureHead).
    """
    geo_field = model.geometry
    x = x.float()
    if getattr(geo_field, "contract", False):  # the contracted space's grid coordinates, chained
        grid_x = contract_to_grid(x)
        enc, d_enc = hash_grid_jacobian(grid_x, geo_field.encoding.params, geo_field.encoding.cfg)
        d_enc = torch.einsum("nij,nie->nje", contraction_jacobian(x), d_enc)
    else:
        enc, d_enc = hash_grid_jacobian(x, geo_field.encoding.params, geo_field.encoding.cfg)
    h, d_h = sequential_jvp(geo_field.mlp, enc, d_enc, 1)
    density = torch.exp(h[:, 0].float() + geo_field.density_bias)  # trunc_exp's forward
    d_density = density[:, None] * d_h[:, :, 0]
    geo, d_geo = h[:, 1:], d_h[:, :, 1:]
    rgb = d_rgb = feats = d_feats = None
    if with_features:
        feats, d_feats = sequential_jvp(model.feature.mlp, torch.cat([enc, geo], -1), torch.cat([d_enc, d_geo], -1), 1)
    if with_rgb:
        degree = model.color.sh_degree
        sh = spherical_harmonics(dirs, degree).to(geo.dtype)[ray_indices]
        d_sh = spherical_harmonics_jacobian(dirs, degree).to(geo.dtype)[ray_indices]  # [N, 3, S]
        n = x.shape[0]
        tangents = torch.cat([torch.cat([d_geo, d_geo.new_zeros(n, 3, sh.shape[1])], -1),
                              torch.cat([d_geo.new_zeros(n, 3, geo.shape[1]), d_sh], -1)], 1)  # [N, 6, G + S]
        logits, d_logits = sequential_jvp(model.color.mlp, torch.cat([geo, sh], -1), tangents, 1)
        rgb = torch.sigmoid(logits.float())
        d_rgb = d_logits * (rgb * (1 - rgb))[:, None, :]
    return FieldSamples(density, d_density, rgb, d_rgb, feats, d_feats)
