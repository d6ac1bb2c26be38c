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
from torch import Tensor

from fastnefes.geometry import generate_rays, pixel_grid, se3_exp, se3_log
from fastnefes.timing import section


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


def textured_pixels(target: torch.Tensor, stride: int, count: int, luma: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
        target: [B, 3, h, w] query colours at the grid (area-downsampled by stride), or any
            [B, C, h, w] map (e.g. features) with luma False: the score is then the gradient
            summed over the channels.
        stride: image pixels per grid pixel; count: the most pixels per query (>= 1).
    Returns:
        pixels [B, N, 2] image coordinates (pixel_grid's centres) and their values [B, N, C],
        N = ceil(h / k) * ceil(w / k) <= count, in raster order (k = 1: every pixel).
    """
    B, _, h, w = target.shape
    k = 1
    while math.ceil(h / k) * math.ceil(w / k) > max(count, 1):
        k += 1
    signal = torch.einsum("bchw,c->bhw", target, torch.tensor(LUMA, device=target.device))[:, None] if luma else target
    padded = F.pad(signal, (1, 1, 1, 1), mode="replicate")
    score = ((padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]).abs()
             + (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]).abs()).sum(1)
    hb, wb = math.ceil(h / k), math.ceil(w / k)
    score = F.pad(score, (0, wb * k - w, 0, hb * k - h), value=-1.0)  # pads never win a block
    blocks = score.view(B, hb, k, wb, k).permute(0, 1, 3, 2, 4).reshape(B, hb, wb, k * k)
    best = blocks.argmax(-1)  # [B, hb, wb]
    dev = target.device
    rows = torch.arange(hb, device=dev)[:, None] * k + torch.div(best, k, rounding_mode="floor")
    cols = torch.arange(wb, device=dev)[None, :] * k + best % k
    index = (rows * w + cols).flatten(1).sort(dim=1).values  # [B, N]
    grid = pixel_grid(h * stride, w * stride, stride, device=dev).reshape(-1, 2)
    values = target.flatten(2).transpose(1, 2)  # [B, h*w, C]
    return grid[index], values.gather(1, index[..., None].expand(*index.shape, values.shape[-1]))


def normal_equations(residual: Tensor, J: Tensor, weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """J^T W J [B, 6, 6] and J^T W r [B, 6] of residuals [B, N, C] with Jacobians [B, N, C, 6]
    (optional per-residual weights [B, N])."""
    Jw = J if weights is None else J * weights[..., None, None]
    return torch.einsum("bnci,bncj->bij", Jw, J), torch.einsum("bnci,bnc->bi", Jw, residual)


def levenberg_marquardt(evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]], poses: Tensor,
                        failed: Tensor, counts: Tensor, iters: int, tol: Tensor, max_step: Tensor,
                        damping: float = 1e-2, progress: Optional[Callable[[int], None]] = None,
                        ftol: float = 0.0) -> Tensor:
    """Levenberg-Marquardt on poses [B, 4, 4] in place, each query on its own.

    evaluate(rows [r] long, candidates [r, 4, 4]) -> (loss [r], J^T J [r, 6, 6], J^T r [r, 6]),
    the Jacobian taken with respect to a local increment: a pose P moves to P @ se3_exp(step).
    A candidate is kept only when it lowers the query's loss (then the damping shrinks); a
    rejected one grows the damping and the next is solved from the last kept pose, so a pose only
    ever improves. Steps are scaled down to fit max_step [6] (a trust region: in textureless
    views J^T J is nearly singular along some direction and an undamped step would leap to
    another, unrelated minimum). Marks failed [B] on a non-finite loss or Jacobian, counts
    evaluations in counts [B], and returns the [B] bool of queries that stopped early: their last
    kept step was within tol [6] or lowered the loss by less than ftol times its value, or no step
    lowers the loss any more.
    """
    B, dev = poses.shape[0], poses.device
    best = torch.full((B,), math.inf, device=dev)
    lam = torch.full((B,), damping, device=dev)
    JtJ = torch.zeros(B, 6, 6, device=dev)
    Jtr = torch.zeros(B, 6, device=dev)
    candidate = poses.clone()
    active = ~failed.clone()
    converged = torch.zeros(B, dtype=torch.bool)
    last_step = torch.full((B, 6), math.inf, device=dev)
    for _ in range(iters):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        rows_d = rows.to(dev)
        loss, A, g = evaluate(rows_d, candidate[rows_d])
        counts[rows] += 1
        bad = ~torch.isfinite(loss) | ~torch.isfinite(A).flatten(1).all(1) | ~torch.isfinite(g).all(1)
        bad_cpu = bad.cpu()
        if bool(bad_cpu.any()):
            failed[rows[bad_cpu]] = True
            active[rows[bad_cpu]] = False
        better = (loss < best[rows_d]) & ~bad
        better_cpu = better.cpu()
        if bool(better_cpu.any()):
            keep = rows_d[better]
            gain = best[keep] - loss[better]  # inf at the first evaluation
            poses[keep] = candidate[keep]
            best[keep] = loss[better]
            JtJ[keep], Jtr[keep] = A[better], g[better]
            lam[keep] = (lam[keep] / 3).clamp_min(1e-7)
            done = ((last_step[keep].abs() <= tol).all(1) | (gain <= ftol * loss[better])).cpu()
            converged[rows[better_cpu][done]] = True
            active[rows[better_cpu][done]] = False
        worse = rows_d[~better & ~bad]
        lam[worse] = lam[worse] * 4
        gave_up = (lam[rows_d] > 1e6).cpu()  # no step lowers the loss any more: a minimum
        converged[rows[gave_up]] = True
        active[rows[gave_up]] = False
        # Marquardt's scaling: damping proportional to the diagonal (rotation and translation
        # live in different units).
        rows_d = active.nonzero()[:, 0].to(dev)
        if rows_d.numel():
            with section("optimizer_step"):
                A, g = JtJ[rows_d], Jtr[rows_d]
                diag = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
                A = A + torch.diag_embed(lam[rows_d, None] * diag)
                step = -torch.linalg.solve(A.double(), g.double()[..., None])[..., 0].float()
                step = step / (step.abs() / max_step).amax(1, keepdim=True).clamp_min(1.0)
                last_step[rows_d] = step
                candidate[rows_d] = poses[rows_d] @ se3_exp(step)
        if progress:
            progress(int((~active).sum()))
    return converged


def levenberg_marquardt_phase(model, K: Tensor, init: Tensor, target: Tensor, height: int, width: int, stride: int,
                              iters: int, delta: Tensor, failed: Tensor, counts: Tensor, tol: Tensor, max_step: Tensor,
                              damping: float = 1e-2, luma: bool = False, progress: Optional[Callable[[int], None]] = None,
                              max_rays: int = 0, band_samples: int = 0, remarch_fraction: float = 0.5,
                              ftol: float = 0.0, jacobian_every: int = 1) -> Tensor:
    """Minimise the mean squared RGB error over delta [B, 6] (increments on init [B, 4, 4]) in
    place, per query, by `levenberg_marquardt`.

    target: [B, 3, height // stride, width // stride] query colours (area-downsampled).
    luma: fit the luma of the colours only (with reverse-mode Jacobians, one backward pass per
    iteration instead of three).
    max_rays: > 0 fits at most this many of the grid's pixels per query, the most textured of
    each block of the grid (textured_pixels); 0 fits them all.
    band_samples: > 0 renders that many samples per ray in a surface band (fastnefes.refine.surface)
    with forward-mode Jacobians (fastnefes.refine.pose_jacobian), marched again where the camera
    moved more than remarch_fraction of the band's half width; 0 marches every ray at every
    iteration, Jacobians by reverse mode (photometric_jacobian).
    jacobian_every: (band_samples 0) > 1 computes a query's Jacobian at every jacobian_every-th of
    its evaluations and keeps it in between, 0 only at its first: the evaluations in between
    render colours only, J^T r from their residuals (direct visual odometry's trick where the
    pose moves little; a step is still kept only when it lowers the loss).
    Marks failed [B], counts renders in counts [B], and returns the [B] bool of queries that
    stopped early.
    """
    from fastnefes.refine.pose_jacobian import render_with_jacobian
    from fastnefes.refine.surface import RaySampler

    B, dev = delta.shape[0], delta.device
    if 0 < max_rays < target.shape[-2] * target.shape[-1]:
        pixels, colours = textured_pixels(target, stride, max_rays)  # [B, N, 2], [B, N, 3]
    else:
        pixels = pixel_grid(height, width, stride, device=dev).reshape(-1, 2)
        colours = target.permute(0, 2, 3, 1).reshape(B, -1, 3)
    mix = torch.tensor([LUMA], device=dev) if luma else None
    if mix is not None:
        colours = colours @ mix.t()
    sampler = RaySampler(model, K, pixels, band_samples, remarch_fraction) if band_samples > 0 else None
    kept_J: dict[int, Tensor] = {}  # jacobian_every != 1: query -> [N, C, 6]
    evaluations = [0] * B

    def reuses_jacobian(r: int) -> bool:
        return jacobian_every != 1 and r in kept_J and (jacobian_every == 0 or evaluations[r] % jacobian_every != 0)

    def evaluate(rows: Tensor, poses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pix = pixels if pixels.dim() == 2 else pixels[rows]
        zero = torch.zeros(len(rows), 6, device=dev)
        reuse = sampler is None and all(reuses_jacobian(int(r)) for r in rows)
        for r in rows.tolist():
            evaluations[r] += 1
        if reuse:
            rgb, _ = photometric_jacobian(model, K[rows], poses, zero, pix, with_jacobian=False, mix=mix)
            J = torch.stack([kept_J[int(r)] for r in rows])
        elif sampler is None:
            rgb, J = photometric_jacobian(model, K[rows], poses, zero, pix, mix=mix)
            if jacobian_every != 1:
                kept_J.update({int(r): J[i] for i, r in enumerate(rows)})
        else:
            out = render_with_jacobian(model, sampler, rows, poses, with_features=False)
            rgb, J = out.rgb, out.d_rgb
            if mix is not None:
                rgb, J = rgb @ mix.t(), torch.einsum("bnci,mc->bnmi", J, mix)
        with section("loss"):
            residual = rgb - colours[rows]
            return (residual.pow(2).mean((1, 2)), *normal_equations(residual, J))

    return levenberg_marquardt_increments(evaluate, init, delta, failed, counts, iters, tol, max_step, damping,
                                          progress, ftol)


def levenberg_marquardt_increments(evaluate, init: Tensor, delta: Tensor, failed: Tensor, counts: Tensor, iters: int,
                                   tol: Tensor, max_step: Tensor, damping: float = 1e-2,
                                   progress: Optional[Callable[[int], None]] = None, ftol: float = 0.0) -> Tensor:
    """`levenberg_marquardt` on the poses init @ se3_exp(delta) ([B, 4, 4], [B, 6]); delta is
    updated in place (only where the pose moved) and the [B] early-stop flags returned."""
    poses = init @ se3_exp(delta)
    start = poses.clone()
    converged = levenberg_marquardt(evaluate, poses, failed, counts, iters, tol, max_step, damping, progress, ftol)
    moved = (poses != start).flatten(1).any(1)
    if bool(moved.any()):
        delta[moved] = se3_log(torch.linalg.inv(init[moved]) @ poses[moved])
    return converged
