"""Direct alignment against a rendered keyframe: refinement with a few renders instead of hundreds.

Adam and the render-side Levenberg-Marquardt differentiate the field at every iteration: one
render (and its backward or forward-tangent pass) per step. Direct alignment, as in direct
visual odometry and PixLoc, renders the field once at the current pose (the keyframe: values
and depth per pixel, no gradients), lifts those pixels to 3D with the rendered depth, and then
solves for the query camera by Levenberg-Marquardt on the residual

    r_i(Q) = query(project(Q^-1 X_i)) - rendered_i

where query() samples the query's own map (features, or colours) bilinearly. The Jacobian is
the query map's image gradient times the projection's derivative: closed form, no field in the
loop, so an iteration costs a grid_sample of a few thousand points. The keyframe is then
rendered again at the solved pose (it corrects the depth and the occlusions the warp assumed),
a few times per level; each query keeps the keyframe pose whose rendered loss was lowest, so
the phase never returns a pose its own renders judged worse.

Features are compared as unit vectors: |a - b|^2 = 2 - 2 cos(a, b), so the squared residual is
NeFeS's cosine loss. Residuals carry Cauchy weights (occluders, regions the field renders badly)
whose scale follows the keyframe's own median residual, so no scene-specific constant enters.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnefes.geometry import backproject, invert_pose, pixel_grid, se3_exp, se3_log
from fastnefes.refine.gauss_newton import levenberg_marquardt, textured_pixels
from fastnefes.timing import section

OUTSIDE_RESIDUAL2 = 4.0  # squared residual charged for a point the candidate pose sees outside the map


def sample_with_gradient(image: Tensor, uv: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear samples of a map and of its image gradient.

    Args:
        image: [B, C, h, w] map whose pixel (i, j) is centred at image coordinates
            ((j + 0.5) stride, (i + 0.5) stride) (pixel_grid's convention).
        uv: [B, N, 2] image coordinates (x, y) in full-resolution pixels.
        stride: image pixels per map pixel.
    Returns:
        values [B, N, C], d values / du [B, N, C], d values / dv [B, N, C] (per image pixel; central
        differences of the map) and inside [B, N] bool (within the map's pixels; the border
        half pixel repeats the edge).
    """
    B, C, h, w = image.shape
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / (2.0 * stride)
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / (2.0 * stride)
    stack = torch.cat([image, gx, gy], 1)
    col = uv[..., 0] / stride - 0.5
    row = uv[..., 1] / stride - 0.5
    grid = torch.stack([2.0 * col / max(w - 1, 1) - 1.0, 2.0 * row / max(h - 1, 1) - 1.0], -1)
    out = F.grid_sample(stack, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=True)
    out = out[..., 0].transpose(1, 2)  # [B, N, 3C]
    inside = (col >= -0.5) & (col <= w - 0.5) & (row >= -0.5) & (row <= h - 0.5)  # the map's pixels
    return out[..., :C], out[..., C:2 * C], out[..., 2 * C:], inside


def warp_equations(query: Tensor, stride: int, K: Tensor, poses: Tensor, points: Tensor, values: Tensor,
                   valid: Tensor, scale2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Robust loss and normal equations of the warp residual at candidate query poses.

    Args:
        query: [B, C, h, w] the query's map at `stride`; K: [B, 3, 3] full-resolution intrinsics.
        poses: [B, 4, 4] candidate camera-to-world poses of the queries.
        points: [B, N, 3] world points of the keyframe's pixels; values: [B, N, C] rendered there.
        valid: [B, N] bool, pixels with a surface; scale2: [B] squared Cauchy scale.
    Returns:
        loss [B] (mean Cauchy penalty over the valid points, a point seen outside the map charged
        OUTSIDE_RESIDUAL2), J^T W J [B, 6, 6] and J^T W r [B, 6] for a local increment
        P -> P @ se3_exp(step) (rotation first).
    """
    w2c = invert_pose(poses)
    y = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]  # [B, N, 3] camera frame
    z = y[..., 2]
    front = z > 1e-6
    zs = torch.where(front, z, torch.ones_like(z))
    fx, fy = K[:, None, 0, 0], K[:, None, 1, 1]
    u = fx * y[..., 0] / zs + K[:, None, 0, 2]
    v = fy * y[..., 1] / zs + K[:, None, 1, 2]
    sampled, du, dv, inside = sample_with_gradient(query, torch.stack([u, v], -1), stride)
    residual = sampled - values
    seen = valid & front & inside
    r2 = torch.where(seen, residual.pow(2).sum(-1), torch.full_like(z, OUTSIDE_RESIDUAL2))
    c2 = scale2[:, None]
    count = valid.sum(1).clamp_min(1)
    loss = (torch.log1p(r2 / c2) * valid).sum(1) / count * c2[:, 0]
    weight = (seen / (1.0 + r2 / c2)).to(residual.dtype)  # IRLS weights of the Cauchy penalty
    # d(u, v) / dy, then dy / d(step): exp(-step) y = y + [y]x w - v to first order.
    inv_z = 1.0 / zs
    du_dy = torch.stack([fx * inv_z, torch.zeros_like(z), -fx * y[..., 0] * inv_z**2], -1)
    dv_dy = torch.stack([torch.zeros_like(z), fy * inv_z, -fy * y[..., 1] * inv_z**2], -1)
    yx, yy, yz = y.unbind(-1)
    zero = torch.zeros_like(yx)
    skew = torch.stack([torch.stack([zero, -yz, yy], -1), torch.stack([yz, zero, -yx], -1),
                        torch.stack([-yy, yx, zero], -1)], -2)  # [B, N, 3, 3] = [y]x
    dy = torch.cat([skew, -torch.eye(3, device=y.device).expand_as(skew)], -1)  # [B, N, 3, 6]
    duv = torch.stack([du_dy, dv_dy], -2) @ dy  # [B, N, 2, 6]
    J = du[..., None] * duv[:, :, None, 0] + dv[..., None] * duv[:, :, None, 1]  # [B, N, C, 6]
    Jw = J * weight[..., None, None]
    return loss, torch.einsum("bnci,bncj->bij", Jw, J), torch.einsum("bnci,bnc->bi", Jw, residual)


def unit(x: Tensor, dim: int) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-6)


def render_keyframe(model, K: Tensor, c2w: Tensor, query: Tensor, height: int, width: int, stride: int,
                    signal: str, max_rays: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The field at poses c2w [B, 4, 4], no gradients: (world points [B, N, 3], values [B, N, C],
    valid [B, N] bool, squared residuals [B, N] and loss [B] against the query's own pixels). Features: every pixel of the
    stride grid (the Feature Fusion module needs the whole map), unit vectors, cosine loss.
    RGB: at most max_rays pixels, the most textured of each block of the query map (the
    pose is close, so the query's texture marks the keyframe's), mean squared error."""
    from fastnefes.render import render_pixels

    B, dev = c2w.shape[0], c2w.device
    if signal == "rgb" and 0 < max_rays < query.shape[-2] * query.shape[-1]:
        pixels, _ = textured_pixels(query, stride, max_rays)  # [B, N, 2]
    else:
        pixels = pixel_grid(height, width, stride, device=dev).reshape(1, -1, 2).expand(B, -1, 2)
    with torch.no_grad():
        if signal == "rgb":
            out = render_pixels(model, K, c2w, pixels[:, :, None, :], fused=False)
            values = out["rgb"][:, :, 0]
        else:
            h, w = height // stride, width // stride
            out = render_pixels(model, K, c2w, pixels.reshape(B, h, w, 2), fused=True)
            values = unit(out["fused"].reshape(B, h * w, -1), -1)
        depth, opacity = out["depth"].reshape(B, -1), out["opacity"].reshape(B, -1)
        points = backproject(pixels[:, :, None, :], depth[:, :, None], K, c2w)[:, :, 0]
        valid = (opacity > 0.5) & (depth > 0)
        sampled, _, _, inside = sample_with_gradient(query, pixels, stride)
        r2 = (sampled - values).pow(2).sum(-1)
        loss = r2.mean(1) / (2.0 if signal != "rgb" else values.shape[-1])  # cosine loss / per-channel MSE
    return points, values, valid & inside, r2, loss


def clipped(step: Tensor, bound: Tensor) -> Tensor:
    """Increments [B, 6] scaled down (whole) to fit bound [B, 6] coordinate by coordinate."""
    return step / (step.abs() / bound).amax(1, keepdim=True).clamp_min(1.0)


def solve_on_keyframe(query: Tensor, stride: int, K: Tensor, poses: Tensor, points: Tensor, values: Tensor,
                      valid: Tensor, r2: Tensor, iters: int, tol: Tensor, max_step: Tensor, damping: float,
                      ftol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt on the warp residual from the keyframe poses [B, 4, 4] (render_keyframe's
    points, values, valid, r2): ([B, 6] the solved increment on poses, [B] bool failed)."""
    solved, failed = poses.clone(), torch.zeros(poses.shape[0], dtype=torch.bool)
    scale2 = cauchy_scale(r2, valid)
    levenberg_marquardt(lambda r, p: warp_equations(query[r], stride, K[r], p, points[r], values[r], valid[r],
                                                    scale2[r]),
                        solved, failed, torch.zeros(poses.shape[0], dtype=torch.long), iters, tol, max_step, damping,
                        ftol=ftol)
    moved = se3_log(torch.linalg.inv(poses) @ solved)
    return torch.where(failed.to(moved.device)[:, None], torch.zeros_like(moved), moved), failed


def cauchy_scale(r2: Tensor, valid: Tensor) -> Tensor:
    """[B] squared Cauchy scale: twice the median squared residual [B, N] over the valid [B, N]
    pixels of a keyframe at its own pose (the field's typical misfit there), floored above 0."""
    med = torch.nanmedian(torch.where(valid, r2, torch.full_like(r2, math.nan)), dim=1).values
    return torch.nan_to_num(2.0 * med, nan=1.0).clamp_min(1e-4)


def direct_alignment_phase(model, K: Tensor, init: Tensor, query: Tensor, height: int, width: int, stride: int,
                           signal: str, renders: int, iters: int, delta: Tensor, failed: Tensor, counts: Tensor,
                           tol: Tensor, max_step: Tensor, damping: float = 1e-2, max_rays: int = 0,
                           progress: Optional[Callable[[int], None]] = None, ftol: float = 0.0,
                           reach: float = 4.0, max_halvings: int = 3) -> Tensor:
    """Direct alignment of queries against keyframes rendered at their current poses.

    Args:
        K: [B, 3, 3]; init: [B, 4, 4] poses that delta [B, 6] (updated in place) is an increment on.
        query: [B, C, h, w] the queries' maps at stride (features or colours).
        signal: "features" or "rgb"; renders: keyframe renders per query at most (the last one
            judges the final solve); iters: Levenberg-Marquardt iterations per keyframe.
        failed [B] is marked on non-finite values; counts [B] counts renders.
        tol [6]: a solve moving less than this (each coordinate) ends the query, converged.
        max_step [6]: trust region of one Levenberg-Marquardt step.
        max_rays: rgb only, the most keyframe pixels per query (0: every pixel of the grid).
    Returns:
        [B] bool, the queries that converged.
    """
    B, dev = delta.shape[0], delta.device
    target = query if signal == "rgb" else unit(query, 1)
    current = init @ se3_exp(delta)
    best_pose, best_loss = current.clone(), torch.full((B,), math.inf, device=dev)
    active = ~failed.clone()
    converged = torch.zeros(B, dtype=torch.bool)
    halvings = torch.zeros(B, dtype=torch.long)
    radius = torch.ones(B, device=dev)  # a keyframe's solve moves at most max_step * radius
    for n in range(renders):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        rd = rows.to(dev)
        with section("keyframe_render"):
            points, values, valid, r2, loss = render_keyframe(model, K[rd], current[rd], target[rd], height, width,
                                                          stride, signal, max_rays)
        counts[rows] += 1
        bad = ~torch.isfinite(loss).cpu()
        better = (loss < best_loss[rd]).cpu() & ~bad
        keep = rows[better]
        best_pose[keep.to(dev)], best_loss[keep.to(dev)] = current[keep.to(dev)], loss[better.to(dev)]
        stop = ~better | bad
        if n == renders - 1:
            break
        # A trust region over keyframes, judged by the renders: a keyframe that came out worse
        # than the best (the warp's depth and occlusions were wrong that far) sends the query
        # back towards its best pose, the region shrunk; a better one widens it.
        back = (stop & ~bad).to(dev)
        radius[rd[back]] = radius[rd[back]] / 4
        radius[rd[~stop.to(dev)]] = (radius[rd[~stop.to(dev)]] * 2).clamp(max=reach)
        if bool(back.any()):
            b = rd[back]
            current[b] = best_pose[b] @ se3_exp(clipped(se3_log(torch.linalg.inv(best_pose[b]) @ current[b]),
                                                        max_step * radius[b, None]))
            halvings[b.cpu()] += 1
        go = (~stop).to(dev)
        if bool(go.any()):
            g = rd[go]
            with section("direct_solve"):
                moved, solve_failed = solve_on_keyframe(target[g], stride, K[g], current[g], points[go], values[go],
                                                        valid[go], r2[go], iters, tol, max_step, damping, ftol)
            moved = clipped(moved, max_step * radius[g, None])
            current[g] = current[g] @ se3_exp(moved)
            small = (moved.abs() <= tol).all(1).cpu()
            converged[g[small].cpu()] = True
            active[g[small | solve_failed].cpu()] = False
        failed[rows[bad]] = True
        active[rows[bad | (halvings[rows] > max_halvings)]] = False
        if progress:
            progress(int((~active).sum()))
    done = torch.isfinite(best_loss)
    if bool(done.any()):
        delta[done] = se3_log(torch.linalg.inv(init[done]) @ best_pose[done])
    return converged
