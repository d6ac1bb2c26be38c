"""Feature Fusion module (NeFeS): a small conv net over rendered RGB + rendered features.

[rgb (3), features (D)] -> n_layers x (Conv3x3 width + ReLU) -> Conv5x5 D -> BatchNorm.
NeFeS uses width 64 and D = 128; the width is configurable because on CPU the convolutions of
a refinement loop are a visible share of its time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureFusion(nn.Module):
    """(rgb [B,3,h,w], features [B,D,h,w]) -> fused features [B,D,h,w]."""

    def __init__(self, feature_dim: int, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3 + feature_dim
        for _ in range(n_layers):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = width
        layers += [nn.Conv2d(in_ch, feature_dim, 5, padding=2), nn.BatchNorm2d(feature_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, rgb: Tensor, features: Tensor) -> Tensor:
        return self.net(torch.cat([rgb, features], dim=1))
