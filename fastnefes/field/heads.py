"""Heads on top of the geometry field: view-dependent static colour, static feature, transient.

- ColorHead: geometry features + spherical-harmonics direction encoding -> RGB in [0, 1].
- FeatureHead: grid encoding + geometry features -> a D-dim feature (view-independent, as NeFeS).
- TransientHead (NeRF-W): grid encoding + a per-image embedding -> transient density, colour and
  uncertainty beta. Used for RGB training only; never for rendering features or test views.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnefes.field.geometry import mlp


def spherical_harmonics(dirs: Tensor, degree: int = 4) -> Tensor:
    """Real spherical harmonics (tiny-cuda-nn order) of unit directions [N,3] -> [N, degree^2]."""
    if not 1 <= degree <= 4:
        raise ValueError(f"spherical harmonics degree must be in 1..4, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * x * z,
                0.54627421529603959 * (xx - yy)]
    if degree > 3:
        out += [0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * x * y * z,
                0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
                0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
                0.59004358992664352 * x * (-xx + 3.0 * yy)]
    return torch.stack(out, dim=-1)


class ColorHead(nn.Module):
    """(geo_features [N,G], unit dirs [R,3], ray_indices [N] or None) -> static RGB [N,3] in [0,1].

    Directions are per ray (encoded once per ray, then gathered per sample) unless ray_indices is None.
    """

    def __init__(self, geo_feat_dim: int, hidden: int = 64, n_hidden: int = 2, sh_degree: int = 4) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.mlp = mlp(geo_feat_dim + sh_degree**2, hidden, n_hidden, 3)

    def forward(self, geo_features: Tensor, dirs: Tensor, ray_indices: Tensor | None = None) -> Tensor:
        sh = spherical_harmonics(dirs, self.sh_degree).to(geo_features.dtype)
        h = torch.cat([geo_features, sh if ray_indices is None else sh[ray_indices]], dim=-1)
        return torch.sigmoid(self.mlp(h).float())


class FeatureHead(nn.Module):
    """(grid encoding [N,E], geo_features [N,G]) -> feature [N,D] (unnormalised)."""

    def __init__(self, encoding_dim: int, geo_feat_dim: int, feature_dim: int, hidden: int = 64,
                 n_hidden: int = 1) -> None:
        super().__init__()
        self.mlp = mlp(encoding_dim + geo_feat_dim, hidden, n_hidden, feature_dim)

    def forward(self, encoding: Tensor, geo_features: Tensor) -> Tensor:
        return self.mlp(torch.cat([encoding, geo_features], dim=-1)).float()


class TransientOutput(NamedTuple):
    density: Tensor  # [N] >= 0
    rgb: Tensor  # [N,3] in [0,1]
    beta: Tensor  # [N] >= 0 (beta_min is added after compositing)


class TransientHead(nn.Module):
    """(grid encoding [N,E], image ids [N]) -> transient density, RGB and uncertainty (NeRF-W)."""

    def __init__(self, encoding_dim: int, n_images: int, embed_dim: int = 16, hidden: int = 64,
                 n_hidden: int = 2, density_bias: float = -4.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max(n_images, 1), embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        self.mlp = mlp(encoding_dim + embed_dim, hidden, n_hidden, 5)
        # Transients start (almost) absent so the static field explains the images first.
        self.density_bias = density_bias

    def forward(self, encoding: Tensor, image_ids: Tensor) -> TransientOutput:
        # index_select, not the embedding's forward: its backward (an index_add) is 3x faster on a CPU.
        embedded = self.embedding.weight.index_select(0, image_ids).to(encoding.dtype)
        h = self.mlp(torch.cat([encoding, embedded], dim=-1)).float()
        return TransientOutput(F.softplus(h[:, 0] + self.density_bias), torch.sigmoid(h[:, 1:4]), F.softplus(h[:, 4]))
