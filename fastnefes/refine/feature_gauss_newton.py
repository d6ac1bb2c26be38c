"""Levenberg-Marquardt on the feature residual: the feature phase in tens of iterations.

The feature-metric loss 1 - mean cosine(rendered, query) is a sum of squares: with unit vectors
n = f / |f| and q = query / |query|, 1 - cos = |n - q|^2 / 2, so the per-pixel residual n - q
and its Jacobian (I - n n^T) J_f / |f| give Gauss-Newton's J^T J and J^T r exactly as for RGB
(fastnefes.refine.gauss_newton's driver). The robust loss log(1 + |n - q|^2 / c^2) is the same
residual with iteratively reweighted least squares weights 2 / (c^2 + |n - q|^2).

The rendered features' pose Jacobian comes from forward tangents (fastnefes.refine.pose_jacobian);
fused features push those tangents through the Feature Fusion convolutions as well, which needs
the whole map; unfused features are per ray, so a subset of the most informative pixels can
stand for the map (`max_rays`, as the RGB polish's textured pixels).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastnefes.geometry import pixel_grid
from fastnefes.refine.field_jacobian import sequential_jvp
from fastnefes.refine.gauss_newton import levenberg_marquardt_increments, textured_pixels
from fastnefes.refine.pose_jacobian import render_with_jacobian
from fastnefes.refine.surface import RaySampler
from fastnefes.timing import section

ROBUST_SCALE2 = 0.25  # squared Cauchy scale on unit-feature distances (as losses.feature_metric_loss)


def feature_equations(rendered: Tensor, jacobian: Tensor, query: Tensor, kind: str = "cosine"
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Loss [B], J^T W J [B, 6, 6] and J^T W r [B, 6] of the feature-metric loss.

    Args:
        rendered: [B, P, D] rendered features; jacobian: [B, P, D, 6] d rendered / d pose.
        query: [B, P, D] the query's features at the same pixels.
        kind: "cosine" (1 - mean cosine) or "robust" (mean Cauchy penalty), as feature_metric_loss.
    Returns:
        the loss (feature_metric_loss's value) and the Gauss-Newton system of its half gradient
        scaled so that J^T W r is the loss's gradient (for cosine; robust: IRLS).
    """
    norm = rendered.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    n = rendered / norm
    q = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    residual = n - q
    J = (jacobian - n[..., None] * torch.einsum("bpd,bpdi->bpi", n, jacobian)[:, :, None]) / norm[..., None]
    s = residual.pow(2).sum(-1)  # [B, P]
    P = rendered.shape[1]
    if kind == "cosine":
        # 1 - n.q: |n - q|^2 / 2 for a unit n, and 1 (cosine 0, as feature_metric_loss) where
        # nothing was rendered (f = 0, n = 0), where |n - q|^2 / 2 would say 1/2. Its gradient
        # is J^T r either way: n^T (I - n n^T) = 0.
        loss, weights = (1.0 - (n * q).sum(-1)).mean(1), None
    elif kind == "robust":
        loss, weights = torch.log1p(s / ROBUST_SCALE2).mean(1), 2.0 / (ROBUST_SCALE2 + s)
    else:
        raise ValueError(f"unknown feature loss {kind!r}")
    Jw = J if weights is None else J * weights[..., None, None]
    JtJ = torch.einsum("bpdi,bpdj->bij", Jw, J) / P
    Jtr = torch.einsum("bpdi,bpd->bi", Jw, residual) / P
    return loss, JtJ, Jtr


def fused_with_jacobian(model, rgb: Tensor, d_rgb: Tensor, features: Tensor, d_features: Tensor, h: int, w: int
                        ) -> tuple[Tensor, Tensor]:
    """The Feature Fusion module over rendered maps and its forward tangents.

    rgb [B, h*w, 3], d_rgb [B, h*w, 3, 6], features [B, h*w, D], d_features [B, h*w, D, 6] in
    raster order. Returns fused [B, h*w, D] and d fused / d pose [B, h*w, D, 6].
    """
    B = rgb.shape[0]
    z = torch.cat([rgb, features], -1).transpose(1, 2).reshape(B, -1, h, w)
    tz = torch.cat([d_rgb, d_features], 2).permute(3, 0, 2, 1).reshape(6, B, -1, h, w)
    fused, t_fused = sequential_jvp(model.fusion.net, z, tz, 0)
    return fused.flatten(2).transpose(1, 2), t_fused.flatten(3).permute(1, 3, 2, 0)


def feature_lm_phase(model, K: Tensor, init: Tensor, target: Tensor, height: int, width: int, stride: int,
                     iters: int, delta: Tensor, failed: Tensor, counts: Tensor, tol: Tensor, max_step: Tensor,
                     damping: float = 1e-2, kind: str = "cosine", fused: bool = True, max_rays: int = 0,
                     band_samples: int = 8, remarch_fraction: float = 0.5,
                     progress: Optional[Callable[[int], None]] = None, ftol: float = 0.0) -> Tensor:
    """Minimise the feature-metric loss over delta [B, 6] (increments on init [B, 4, 4]) in
    place, per query, by Levenberg-Marquardt.

    target: [B, D, h, w] the query's features at the render grid (h = height // stride).
    fused: compare the Feature Fusion module's output (every pixel of the grid); False: the
    composited features, at most max_rays pixels per query (> 0: the most informative pixel of
    each block of the grid, by the query features' gradient).
    band_samples: samples per ray in a surface band (0: a full march at every render).
    Returns the [B] bool of queries that stopped early.
    """
    dev = delta.device
    h, w = height // stride, width // stride
    target = target[..., :h, :w]
    if not fused and 0 < max_rays < h * w:
        pixels, query = textured_pixels(target, stride, max_rays, luma=False)
    else:
        pixels = pixel_grid(height, width, stride, device=dev).reshape(-1, 2)
        query = target.flatten(2).transpose(1, 2)
    sampler = RaySampler(model, K, pixels, band_samples, remarch_fraction)

    def evaluate(rows: Tensor, poses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = render_with_jacobian(model, sampler, rows, poses, with_features=True)
        if fused:
            with section("field_forward"):  # the Feature Fusion module: part of the field
                feats, J = fused_with_jacobian(model, out.rgb, out.d_rgb, out.features, out.d_features, h, w)
        else:
            feats, J = out.features, out.d_features
        with section("loss"):
            return feature_equations(feats, J, query[rows], kind)

    return levenberg_marquardt_increments(evaluate, init, delta, failed, counts, iters, tol, max_step, damping, progress,
                                          ftol)
