"""The geometry field: hash-grid encoding + a small MLP -> density and geometry features.

Positions are in the hash grid's unit cube (the model's SceneNormalization maps the dataset's
frame there). Density is in unit-cube units (per unit length along a ray in that cube).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastnefes.field.space import contract_to_grid
from fastnefes.ops.hashgrid import HashGridConfig, HashGridEncoding


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)): keeps early density spikes from exploding."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """Elementwise exp with a truncated gradient (instant-ngp's density activation)."""
    return _TruncExp.apply(x)


def mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int) -> nn.Sequential:
    """in -> n_hidden x (Linear hidden + ReLU) -> Linear out (no output activation)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class GeometryOutput(NamedTuple):
    density: Tensor  # [N] >= 0, unit-cube units
    geo_features: Tensor  # [N, G]
    encoding: Tensor  # [N, L*F] raw hash-grid features


class GeometryField(nn.Module):
    """x [N,3] normalised positions -> density [N], geometry features [N, geo_feat_dim], grid
    encoding. Bounded space: x in [0,1]^3 is the grid's domain. contract=True: x anywhere, the
    [0,1]^3 foreground and the space around it contracted into the grid (fastnefes.field.space)."""

    def __init__(self, grid: HashGridConfig, hidden: int = 64, n_hidden: int = 1, geo_feat_dim: int = 15,
                 density_bias: float = -1.0, contract: bool = False) -> None:
        super().__init__()
        self.contract = contract
        self.encoding = HashGridEncoding(grid)
        self.mlp = mlp(self.encoding.n_output_dims, hidden, n_hidden, 1 + geo_feat_dim)
        self.geo_feat_dim = geo_feat_dim
        # Starts the field nearly empty but not dead (instant-ngp / nerfacc choice).
        self.density_bias = density_bias

    @property
    def n_output_dims(self) -> int:
        """Width of the 'encoding' the feature and transient heads read."""
        return self.encoding.n_output_dims

    def forward(self, x: Tensor) -> GeometryOutput:
        enc = self.encoding(contract_to_grid(x) if self.contract else x)
        h = self.mlp(enc)
        density = trunc_exp(h[:, 0].float() + self.density_bias)
        return GeometryOutput(density, h[:, 1:], enc)

    def density(self, x: Tensor) -> Tensor:
        """x [N,3] -> density [N] (no geometry features needed)."""
        return self.forward(x).density
