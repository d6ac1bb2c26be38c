"""Feature-metric losses between rendered and query feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cosine", "robust")


def feature_metric_loss(rendered: torch.Tensor, query: torch.Tensor, kind: str = "cosine", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query loss between feature maps.

    Args:
        rendered: [B, D, h, w] features rendered at the current poses.
        query: [B, D, h, w] the query images' encoder features (same resolution).
        kind: "cosine": 1 - mean cosine similarity (NeFeS). "robust": the mean Cauchy (Lorentzian)
            penalty log(1 + r^2 / c^2) of the per-pixel distance between unit-normalised features,
            which down-weights pixels whose appearance changed (occluders, unmodelled content).
        mask: optional [B, h, w] bool of pixels to use (e.g. where the field has content).
    Returns:
        [B] losses.
    """
    if kind == "cosine":
        per_pixel = 1.0 - F.cosine_similarity(rendered, query, dim=1, eps=1e-6)
    elif kind == "robust":
        r2 = (F.normalize(rendered, dim=1, eps=1e-6) - F.normalize(query, dim=1, eps=1e-6)).pow(2).sum(1)
        c2 = 0.25  # squared scale of the Cauchy kernel on unit-vector distances (max distance^2 = 4)
        per_pixel = torch.log1p(r2 / c2)
    else:
        raise ValueError(f"unknown feature loss {kind!r} (expected one of {', '.join(LOSSES)})")
    if mask is None:
        return per_pixel.flatten(1).mean(1)
    m = mask.to(per_pixel.dtype)
    return (per_pixel * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def photometric_loss(rendered_rgb: torch.Tensor, query_rgb: torch.Tensor) -> torch.Tensor:
    """Per-query mean squared RGB error (iNeRF-style). Both [B, 3, h, w] in [0, 1]. Returns [B]."""
    return (rendered_rgb - query_rgb).pow(2).flatten(1).mean(1)
