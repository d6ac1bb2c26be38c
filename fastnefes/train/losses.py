"""Training losses and image metrics.

- photometric_loss: NeRF-W's uncertainty-weighted colour loss (or plain MSE without transients).
- contrastive_loss: pixel-level InfoNCE between rendered and encoder features, with geometry-
  aware soft positives (pixels whose rendered surface points coincide are positives, so two
  views of one point pull together and nearby pixels are not pushed apart), both directions.
- variance_covariance_loss: anti-collapse regulariser (VICReg-style) on unit features.
- distill_loss: L1 + cosine distance to a frozen extractor's features.
- distortion_loss: mip-NeRF 360's distortion regulariser (weights gathered at one surface).
- psnr, ssim: image metrics (SSIM: 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def photometric_loss(rgb: Tensor, target: Tensor, beta: Optional[Tensor] = None,
                     transient_density: Optional[Tensor] = None, transient_reg: float = 0.01) -> Tensor:
    """rgb, target [R,3]; beta [R] (>= beta_min) -> scalar.

    With beta: mean(|c - c*|^2 / (2 beta^2) + log beta) + transient_reg * mean transient density (NeRF-W).
    """
    sq = (rgb - target).pow(2).sum(-1)
    if beta is None:
        return sq.mean() / 3.0
    loss = (sq / (2.0 * beta.pow(2)) + torch.log(beta)).mean()
    if transient_density is not None:
        loss = loss + transient_reg * transient_density
    return loss


def depth_loss(depth: Tensor, target: Tensor) -> Tensor:
    """Mean relative L1 between rendered and ground-truth ray distances [R] over the rays with a
    valid target (> 0); 0 when there are none. Relative, so near and far surfaces weigh alike
    and the weight means the same in every scene's units (DS-NeRF-style depth supervision)."""
    valid = target > 0
    rel = (depth - target).abs() / torch.where(valid, target, torch.ones_like(target))
    return (rel * valid).sum() / valid.sum().clamp_min(1)  # no host sync


def distortion_loss(weights: Tensor, t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """mip-NeRF 360's distortion loss of packed samples, mean over the n_rays rays -> scalar.

    Per ray: sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t_end_i - t_start_i), m the interval
    midpoints. Small when a ray's weight sits in one short stretch: it drains the fog of weakly
    dense samples spread around surfaces, which shows up as blur in novel views and as many
    samples per ray for refinement to evaluate. Samples sorted by ray and, within a ray, by t
    (packed), so the double sum is O(N): 2 sum_i w_i (m_i W_i - S_i), W_i and S_i the sums of
    w_j and w_j m_j over the ray's earlier samples.

    Args:
        weights: [N] volume-rendering weights (sample_weights); t_starts, t_ends: [N];
        ray_indices: [N] long, sorted.
    """
    from fastnefes.ops.composite._torch_impl import exclusive_segment_sum

    mid = (t_starts + t_ends) * 0.5
    sums = exclusive_segment_sum(torch.stack([weights, weights * mid], -1), ray_indices, n_rays)  # one pass, both sums
    before, moment_before = sums.unbind(-1)
    between = 2.0 * (weights * (mid * before - moment_before)).sum()
    within = (weights.pow(2) * (t_ends - t_starts)).sum() / 3.0
    return (between + within) / max(n_rays, 1)


def soft_positive_targets(points: Tensor, radius: float) -> Tensor:
    """Rows of soft positives [P,P] from surface points [P,3]: exp(-d^2 / (2 r^2)), rows sum to 1."""
    d2 = torch.cdist(points, points).pow(2)
    w = torch.exp(-d2 / (2.0 * radius * radius))
    return w / w.sum(-1, keepdim=True)


def contrastive_loss(rendered: Tensor, encoded: Tensor, points: Optional[Tensor] = None, radius: float = 0.01,
                     temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE over P pixels: rendered [P,D] vs encoded [P,D] (normalised inside).

    points [P,3]: rendered surface points (unit cube) giving soft positives; None = identity targets.
    """
    r = F.normalize(rendered.float(), dim=-1)
    e = F.normalize(encoded.float(), dim=-1)
    logits = r @ e.t() / temperature
    targets = torch.eye(r.shape[0], device=r.device) if points is None else soft_positive_targets(points.float(), radius)
    loss_r = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_e = -(targets.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_r + loss_e)


def variance_covariance_loss(features: Tensor) -> tuple[Tensor, Tensor]:
    """Anti-collapse terms for unit features [P,D], scaled so an isotropic spread scores 0.

    variance: mean over dims of relu(1 - sqrt(D) std_d); covariance: sum of squared
    off-diagonal entries of D * cov, over D.
    """
    f = F.normalize(features.float(), dim=-1)
    n, d = f.shape
    f = f - f.mean(0, keepdim=True)
    std = torch.sqrt(f.pow(2).sum(0) / max(n - 1, 1) + 1e-6)
    variance = F.relu(1.0 - std * math.sqrt(d)).mean()
    cov = (f.t() @ f) / max(n - 1, 1) * d
    off = cov - torch.diag(torch.diagonal(cov))
    return variance, off.pow(2).sum() / d


def distill_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 + (1 - cosine) between predicted and target features [P,D]."""
    return (pred - target).abs().mean() + (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB) of images in [0,1] (any matching shapes)."""
    mse = (pred.float() - target.float()).pow(2).mean()
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-x.pow(2) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] @ g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of images [B,C,H,W] in [0, data_range], averaged over
    channels: gaussian window (11x11, sigma 1.5), K1 = 0.01, K2 = 0.03, 'valid' filtering (no
    padding) -> [B, H - window + 1, W - window + 1], each value the SSIM of the window it centres."""
    pred, target = pred.double(), target.double()
    c = pred.shape[1]
    win = _gaussian_window(window, sigma, c, pred.device, pred.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, win, groups=c)

    mu_x, mu_y = filt(pred), filt(target)
    sxx = filt(pred * pred) - mu_x.pow(2)
    syy = filt(target * target) - mu_y.pow(2)
    sxy = filt(pred * target) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x.pow(2) + mu_y.pow(2) + c1) * (sxx + syy + c2)
    return (num / den).mean(1)


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of images [B,C,H,W] (ssim_map averaged over the image) -> [B]."""
    return ssim_map(pred, target, window, sigma, data_range).flatten(1).mean(1).float()
