"""Verification of a refinement against the query image itself (NeFeS's last step).

The optimiser minimises a feature loss; a field that is wrong somewhere (poorly constrained
geometry, features that match a repeated structure) can have its minimum away from the truth,
and then refinement moves the pose there and reports success. The query's own pixels are
independent evidence: the field's colour, rendered at the initial and at the refined pose
(through the exposure transform predicted from the query's histogram), is compared with the
query on the pixels where both renders see content. The refined pose is kept only when its
rendering matches the query better (SSIM on the overlap); otherwise the initial pose comes
back, flagged. A per-query confidence (the SSIM at the returned pose times the share of the
view the field covers) says how far to trust the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 7  # pixels at the verification resolution (small maps: 11 would eat the border)
MIN_OPACITY = 0.5  # a pixel counts where the field renders content at both poses


@dataclass
class Verdict:
    """Per query [B]: keep the refined pose?, and the evidence."""

    accept: Tensor  # bool
    ssim_initial: Tensor  # SSIM of the rendering at the initial pose vs the query, on the overlap
    ssim_refined: Tensor
    psnr_initial: Tensor  # dB, on the same pixels
    psnr_refined: Tensor
    coverage: Tensor  # share of the verification pixels in the overlap
    confidence: Tensor  # in [0, 1], of the pose the verdict returns


def verification_stride(height: int, width: int, rays: int) -> int:
    """Render stride giving about `rays` pixels per view (at least 1)."""
    return max(1, int(round(math.sqrt(height * width / max(rays, 1)))))


@torch.no_grad()
def render_for_verification(model, K: Tensor, c2w: Tensor, height: int, width: int, stride: int,
                            histograms: Tensor | None, render: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """(RGB [B,3,h,w] through the query's exposure transform where the model has one,
    opacity [B,h,w]) at poses c2w [B,4,4]. render(K, c2w, height, width, stride, fused, with_features): the
    whole-view renderer (default fastnefes.render.render_image; a refinement's RenderMemo)."""
    from fastnefes.render import exposure_adapted, render_image

    if render is None:
        out = render_image(model, K, c2w, height, width, stride=stride, fused=False, with_features=False)
    else:
        out = render(K, c2w, height, width, stride, fused=False, with_features=False)
    rgb = out["rgb"] if histograms is None else exposure_adapted(model, out["rgb"], histograms)
    return rgb.clamp(0, 1).permute(0, 3, 1, 2), out["opacity"]


def _masked_scores(rendered: Tensor, query: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(SSIM [B], PSNR [B]) of rendered vs query [B,3,h,w] over mask [B,h,w] (SSIM windows
    counted where their centre pixel is in the mask)."""
    from fastnefes.train.losses import ssim_map

    window = min(SSIM_WINDOW, rendered.shape[-2], rendered.shape[-1])
    window -= 1 - window % 2  # odd
    smap = ssim_map(rendered, query, window=window, sigma=1.5)
    r = window // 2
    inner = mask[:, r: r + smap.shape[-2], r: r + smap.shape[-1]].to(smap.dtype)
    ssim = (smap * inner).flatten(1).sum(1) / inner.flatten(1).sum(1).clamp_min(1.0)
    m = mask.to(rendered.dtype)[:, None]
    mse = ((rendered - query) ** 2 * m).flatten(1).sum(1) / (3 * m.flatten(1).sum(1)).clamp_min(1.0)
    psnr = -10.0 * torch.log10(mse.clamp_min(1e-10))
    return ssim.float(), psnr.float()


@torch.no_grad()
def verify_refinement(model, images: np.ndarray | Tensor, K: Tensor, initial: Tensor, refined: Tensor,
                      rays: int = 4800, margin: float = 0.0, render: Optional[Callable] = None) -> Verdict:
    """Judge refined poses against initial ones by the query images.

    Args:
        model: the feature-field model; images: uint8 [B,H,W,3] queries; K: [B,3,3];
        initial, refined: [B,4,4] camera-to-world poses (dataset frame).
        rays: pixels rendered per view and pose (sets the stride).
        margin: SSIM the refined pose must gain over the initial one to be kept.
        render: the whole-view renderer (render_for_verification).
    Returns:
        Verdict with [B] tensors. A query whose renderings share no content pixel, or whose
        scores are not finite, is not accepted (coverage 0, confidence 0).
    """
    from fastnefes.field.act import luma_histogram

    device = model.device
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images, device=device)
    B, H, W = x.shape[:3]
    stride = verification_stride(H, W, rays)
    hist = luma_histogram(x.cpu(), model.config.act_bins).to(device) if getattr(model, "act", None) is not None else None
    query = F.interpolate(x.permute(0, 3, 1, 2).float() / 255.0, size=(H // stride, W // stride), mode="area")
    K, initial, refined = (t.to(device=device, dtype=torch.float32) for t in (K, initial, refined))
    (rgb0, opacity0), (rgb1, opacity1) = (render_for_verification(model, K, poses, H, W, stride, hist, render)
                                          for poses in (initial, refined))
    mask = (opacity0 > MIN_OPACITY) & (opacity1 > MIN_OPACITY)
    coverage = mask.flatten(1).float().mean(1)
    (ssim0, psnr0), (ssim1, psnr1) = (_masked_scores(rgb, query, mask) for rgb in (rgb0, rgb1))
    finite = torch.isfinite(ssim0) & torch.isfinite(ssim1) & (coverage > 0)
    accept = finite & (ssim1 > ssim0 + margin)
    returned = torch.where(accept, ssim1, ssim0)
    confidence = torch.where(finite, returned.clamp(0, 1) * coverage, torch.zeros_like(returned))
    return Verdict(accept, ssim0, ssim1, psnr0, psnr1, coverage, confidence)


REFERENCE_VIEWS = 8  # training views the pixel reference is measured on


def calibrate_pixel_check(model, scene, rays: int = 4800, views: int = REFERENCE_VIEWS) -> float:
    """The field's own fit to its training images: median SSIM (as verify_refinement scores it)
    of up to `views` training views, evenly spaced, rendered at their poses. Stored on the model
    (`model.pixel_reference`) and returned; the absolute part of the pixel check is relative to it."""
    cached = getattr(model, "pixel_reference", None)
    if cached is not None:
        return cached
    train = scene.split("train")
    pick = [train[int(k)] for k in np.linspace(0, len(train) - 1, min(views, len(train)))]
    scores = []
    for i in pick:  # one at a time: training images may differ in size
        c2w = torch.as_tensor(scene.c2w[i:i + 1], dtype=torch.float32)
        v = verify_refinement(model, scene.image(i)[None], torch.as_tensor(scene.K[i:i + 1], dtype=torch.float32),
                              c2w, c2w, rays=rays)
        if bool(torch.isfinite(v.ssim_initial[0])) and float(v.coverage[0]) > 0:
            scores.append(float(v.ssim_initial[0]))
    model.pixel_reference = float(np.median(scores)) if scores else None
    return model.pixel_reference


def apply_verification(model, images: np.ndarray, K: np.ndarray, result, rays: int = 4800,
                       margin: float = 0.0, min_fraction: float = 0.6, render: Optional[Callable] = None):
    """Judge a RefineResult by the query pixels, in place. A candidate pose (status converged or
    max_iters) is replaced by the initial pose (status kept_initial, rejected_by_pixels set) when
    its rendering does not match the query better than the initial pose's, or, where the model
    carries a pixel reference (calibrate_pixel_check), when its SSIM is below min_fraction of it:
    the field then cannot explain the query at the refined pose, and a match better than at a
    poor start proves nothing. Every query gets its confidence and scores.
    images: uint8 [B,H,W,3]; K: [B,3,3]. Returns the result."""
    B = len(result.diagnostics)
    if B == 0:
        return result
    verdict = verify_refinement(model, images, torch.as_tensor(np.asarray(K), dtype=torch.float32),
                                torch.as_tensor(result.initial, dtype=torch.float32),
                                torch.as_tensor(result.poses, dtype=torch.float32), rays=rays, margin=margin,
                                render=render)
    reference = getattr(model, "pixel_reference", None)
    floor = -math.inf if reference is None else min_fraction * reference
    for i, diag in enumerate(result.diagnostics):
        candidate = diag.status in ("converged", "max_iters")
        if candidate and not (bool(verdict.accept[i]) and float(verdict.ssim_refined[i]) >= floor):
            result.poses[i] = result.initial[i]
            diag.status, diag.rejected_by_pixels = "kept_initial", True
        at_refined = diag.status in ("converged", "max_iters")
        ssim = float(verdict.ssim_refined[i] if at_refined else verdict.ssim_initial[i])
        cover = float(verdict.coverage[i])
        diag.confidence = min(max(ssim, 0.0), 1.0) * cover if math.isfinite(ssim) and cover > 0 else 0.0
        diag.ssim_initial, diag.ssim_refined = _finite(verdict.ssim_initial[i]), _finite(verdict.ssim_refined[i])
        diag.psnr_initial, diag.psnr_refined = _finite(verdict.psnr_initial[i]), _finite(verdict.psnr_refined[i])
    return result


def _finite(x: Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None
