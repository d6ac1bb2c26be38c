"""Levenberg-Marquardt on the photometric residual: the precise final phase of pose refinement.

Adam follows the gradient coordinate by coordinate, so it crawls along the valley where a small
rotation and a translation nearly cancel in the image. Gauss-Newton sees that coupling in the
6x6 matrix J^T J and converges in a handful of iterations from a few cm / degrees.

The Jacobian of every pixel's colour with respect to the pose comes from reverse mode cheaply:
each ray gets its own copy of the pose increment (same value), so one backward pass per colour
channel yields the per-ray rows of J [B, N, 3, 6] at once (rays are rendered independently).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastnefes.geometry import generate_rays, pixel_grid, se3_exp


LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights: one backward pass instead of three


def photometric_jacobian(model, K: torch.Tensor, init: torch.Tensor, delta: torch.Tensor, pixels: torch.Tensor,
                         with_jacobian: bool = True, mix: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rendered colours and their pose Jacobian at poses init @ exp(delta).

    Args:
        model: the feature-field model (parameters frozen by the caller).
        K: [B, 3, 3] intrinsics; init: [B, 4, 4] camera-to-world; delta: [B, 6] se(3) increments.
        pixels: [N, 2] image coordinates of the rays, shared by the queries, or [B, N, 2] per query.
        with_jacobian: False renders colours only (no graph is kept).
        mix: optional [C, 3] channel mix applied to the colours (e.g. [LUMA]: one channel, so
            one backward pass); None keeps RGB (C = 3).
    Returns:
        colours [B, N, C] and J [B, N, C, 6] (d colours / d delta), or None without the Jacobian.
    """
    from fastnefes.render import render_rays

    B, N = delta.shape[0], pixels.shape[-2]
    with torch.set_grad_enabled(with_jacobian):
        d = delta.detach()[:, None, :].expand(B, N, 6).contiguous().requires_grad_(with_jacobian)
        c2w = init[:, None] @ se3_exp(d.reshape(-1, 6)).reshape(B, N, 4, 4)
        origins, dirs, _ = generate_rays(K[:, None].expand(B, N, 3, 3), c2w, pixels.expand(B, N, 2))
        rgb = render_rays(model, origins.reshape(-1, 3), dirs.reshape(-1, 3), with_features=False)["rgb"]
        rgb = rgb.reshape(B, N, 3)
        if mix is not None:
            rgb = rgb @ mix.t()
        if not with_jacobian:
            return rgb, None
        C = rgb.shape[-1]
        rows = [torch.autograd.grad(rgb[..., c].sum(), d, retain_graph=c < C - 1)[0] for c in range(C)]
    return rgb.detach(), torch.stack(rows, 2)


def textured_pixels(target: torch.Tensor, stride: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `count` pixels of a stride grid per query, spread over the image, each the most
    textured of its block.

    Only pixels near intensity changes have a photometric Jacobian worth the name (a flat
    region's colour does not change when the camera moves a little), so Gauss-Newton on them
    keeps most of J^T J at a fraction of the rays. As in direct visual odometry (DSO) the grid is
    cut into k x k blocks, k the smallest giving at most `count` of them, and each block gives
    its pixel with the largest luma gradient (central differences: both sides of an edge score).
    Blocks, not a global top-k: the strongest edges are often occlusion boundaries, where a
    field renders least accurately, and a global ranking spends every ray there (it cost
    accuracy on the room benchmark).

    Args:
        target: [B, 3, h, w] query colours at the grid (area-downsampled by stride).
        stride: image pixels per grid pixel; count: the most pixels per query (>= 1).
    Returns:
        pixels [B, N, 2] image coordinates (pixel_grid's centres) and their colours [B, N, 3],
        N = ceil(h / k) * ceil(w / k) <= count, in raster order (k = 1: every pixel).
    """
    B, _, h, w = target.shape
    k = 1
    while math.ceil(h / k) * math.ceil(w / k) > max(count, 1):
        k += 1
    luma = torch.einsum("bchw,c->bhw", target, torch.tensor(LUMA, device=target.device))
    padded = F.pad(luma[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    score = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]).abs() + (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]).abs()
    hb, wb = math.ceil(h / k), math.ceil(w / k)
    score = F.pad(score, (0, wb * k - w, 0, hb * k - h), value=-1.0)  # pads never win a block
    blocks = score.view(B, hb, k, wb, k).permute(0, 1, 3, 2, 4).reshape(B, hb, wb, k * k)
    best = blocks.argmax(-1)  # [B, hb, wb]
    dev = target.device
    rows = torch.arange(hb, device=dev)[:, None] * k + torch.div(best, k, rounding_mode="floor")
    cols = torch.arange(wb, device=dev)[None, :] * k + best % k
    index = (rows * w + cols).flatten(1).sort(dim=1).values  # [B, N]
    grid = pixel_grid(h * stride, w * stride, stride, device=dev).reshape(-1, 2)
    colours = target.flatten(2).transpose(1, 2)  # [B, h*w, 3]
    return grid[index], colours.gather(1, index[..., None].expand(*index.shape, 3))


def levenberg_marquardt_phase(model, K: torch.Tensor, init: torch.Tensor, target: torch.Tensor, height: int,
                              width: int, stride: int, iters: int, delta: torch.Tensor, failed: torch.Tensor,
                              counts: torch.Tensor, tol: torch.Tensor, max_step: torch.Tensor, damping: float = 1e-2,
                              luma: bool = False, progress: Optional[Callable[[int], None]] = None,
                              max_rays: int = 0) -> torch.Tensor:
    """Minimise the mean squared RGB error over delta [B, 6] in place, per query.

    target: [B, 3, height // stride, width // stride] query colours (area-downsampled).
    luma: fit the luma of the colours only (one backward pass per iteration instead of three).
    max_rays: > 0 fits at most this many of the grid's pixels per query, the most textured of
    each block of the grid (textured_pixels); 0 fits them all.
    A step is kept only when it lowers the query's loss (then the damping shrinks); a rejected
    step grows the damping and is retried from the last kept pose, so delta only ever improves.
    Marks failed [B] on a non-finite loss, counts renders in counts [B], and returns the [B]
    bool of queries whose last kept step was within tol [6]. Steps are scaled down to fit
    max_step [6] (a trust region: in textureless views J^T J is nearly singular along some
    direction and an undamped step would leap to another, unrelated minimum).
    """
    B, dev = delta.shape[0], delta.device
    if 0 < max_rays < target.shape[-2] * target.shape[-1]:
        pixels, colours = textured_pixels(target, stride, max_rays)  # [B, N, 2], [B, N, 3]
    else:
        pixels = pixel_grid(height, width, stride, device=dev).reshape(-1, 2)
        colours = target.permute(0, 2, 3, 1).reshape(B, -1, 3)
    mix = torch.tensor([LUMA], device=dev) if luma else None
    if mix is not None:
        colours = colours @ mix.t()
    best = torch.full((B,), math.inf, device=dev)
    lam = torch.full((B,), damping, device=dev)
    JtJ = torch.zeros(B, 6, 6, device=dev)
    Jtr = torch.zeros(B, 6, device=dev)
    candidate = delta.clone()
    active = ~failed.clone()
    converged = torch.zeros(B, dtype=torch.bool)
    last_step = torch.full((B, 6), math.inf, device=dev)
    for _ in range(iters):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        rows_d = rows.to(dev)
        rgb, J = photometric_jacobian(model, K[rows_d], init[rows_d], candidate[rows_d],
                                      pixels if pixels.dim() == 2 else pixels[rows_d], mix=mix)
        residual = rgb - colours[rows_d]
        loss = residual.pow(2).mean((1, 2))
        counts[rows] += 1
        bad = ~torch.isfinite(loss) | ~torch.isfinite(J).flatten(1).all(1)
        if bool(bad.any()):
            failed[rows[bad.cpu()]] = True
            active[rows[bad.cpu()]] = False
        better = (loss < best[rows_d]) & ~bad
        if bool(better.any()):
            keep = rows_d[better]
            delta[keep] = candidate[keep]
            best[keep] = loss[better]
            Jb, rb = J[better], residual[better]
            JtJ[keep] = torch.einsum("bnci,bncj->bij", Jb, Jb)
            Jtr[keep] = torch.einsum("bnci,bnc->bi", Jb, rb)
            lam[keep] = (lam[keep] / 3).clamp_min(1e-7)
            done = (last_step[keep].abs() <= tol).all(1).cpu()
            converged[rows[better.cpu()][done]] = True
            active[rows[better.cpu()][done]] = False
        worse = rows_d[~better & ~bad]
        lam[worse] = lam[worse] * 4
        gave_up = (lam[rows_d] > 1e6).cpu()  # no step lowers the loss any more: a minimum
        converged[rows[gave_up]] = True
        active[rows[gave_up]] = False
        # Marquardt's scaling: damping proportional to the diagonal (rotation and translation
        # live in different units).
        rows_d = active.nonzero()[:, 0].to(dev)
        if rows_d.numel():
            A, g = JtJ[rows_d], Jtr[rows_d]
            diag = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
            A = A + torch.diag_embed(lam[rows_d, None] * diag)
            step = -torch.linalg.solve(A.double(), g.double()[..., None])[..., 0].float()
            step = step / (step.abs() / max_step).amax(1, keepdim=True).clamp_min(1.0)
            last_step[rows_d] = step
            candidate[rows_d] = delta[rows_d] + step
        if progress:
            progress(int((~active).sum()))
    return converged
