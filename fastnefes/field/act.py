"""Exposure-adaptive affine colour transform (ACT, NeFeS).

A 10-bin histogram of an image's luma goes through a small MLP (3 x 32) that predicts a 3x3
matrix K and a bias b; the rendered colour becomes rgb' = sigmoid(K logit(rgb) + b). Working on
the logit makes the transform exactly the identity at initialisation (K = I, b = 0), so the
static field is trained against unmodified colours until the images ask for more.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fastnefes.field.geometry import mlp

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Keeps logit(rgb) finite (and its gradient bounded) for pure black / white.
_LOGIT_EPS = 1e-3


def luma_histogram(image: np.ndarray | Tensor, bins: int = 10) -> Tensor:
    """Normalised luma histogram of uint8 RGB [H,W,3] (or [B,H,W,3]) -> [bins] (or [B,bins]) float32."""
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    batched = img.dim() == 4
    img = img.reshape(-1, *img.shape[-3:]).float()
    luma = (img * torch.tensor(LUMA_WEIGHTS, device=img.device)).sum(-1) / 255.0  # [B,H,W]
    index = (luma * bins).long().clamp_(0, bins - 1).flatten(1)
    hist = torch.zeros(index.shape[0], bins, device=img.device).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    hist = hist / index.shape[1]
    return hist if batched else hist[0]


class ExposureACT(nn.Module):
    """histogram [B,bins] -> (K [B,3,3], b [B,3]); apply(rgb [N,3], K [N,3,3], b [N,3]) -> rgb' [N,3]."""

    def __init__(self, bins: int = 10, hidden: int = 32, n_hidden: int = 3) -> None:
        super().__init__()
        self.bins = bins
        self.mlp = mlp(bins, hidden, n_hidden, 12)
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.cat([torch.eye(3).flatten(), torch.zeros(3)]))

    def transform(self, histograms: Tensor) -> tuple[Tensor, Tensor]:
        out = self.mlp(histograms.float())
        return out[:, :9].reshape(-1, 3, 3), out[:, 9:]

    @staticmethod
    def apply_transform(rgb: Tensor, K: Tensor, b: Tensor) -> Tensor:
        logits = torch.logit(rgb.clamp(_LOGIT_EPS, 1.0 - _LOGIT_EPS))
        return torch.sigmoid((K @ logits.unsqueeze(-1)).squeeze(-1) + b)

    def forward(self, rgb: Tensor, histograms: Tensor) -> Tensor:
        """rgb [N,3] in [0,1], histograms [N,bins] (one per ray's image) -> [N,3]."""
        K, b = self.transform(histograms)
        return self.apply_transform(rgb, K, b)
