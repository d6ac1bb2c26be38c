"""Direct alignment against a rendered keyframe: refinement with a few renders instead of hundreds.

Adam and the render-side Levenberg-Marquardt differentiate the field at every iteration: one
render (and its backward or forward-tangent pass) per step. Direct alignment, as in direct
visual odometry and PixLoc, renders the field once at the current pose (the keyframe: values
and depth per pixel, no gradients), lifts those pixels to 3D with the rendered depth, and then
solves for the query camera by damped Gauss-Newton on the residual

    r_i(Q) = query(project(Q^-1 X_i)) - rendered_i

where query() samples the query's own map (features, or colours) bilinearly. The Jacobian is
the query map's image gradient times the projection's derivative: closed form, no field in the
loop, so an iteration costs a grid_sample of a few thousand points. The keyframe is then
rendered again at the solved pose (it corrects the depth and the occlusions the warp assumed),
a few times per level, a trust region over keyframes judged by their renders; each query keeps
the keyframe pose whose rendered loss was lowest, so the phase never returns a pose its own
renders judged worse.

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

from fastnefes.geometry import backproject, pixel_grid, se3_exp, se3_log, world_to_camera
from fastnefes.refine.gauss_newton import textured_pixels
from fastnefes.timing import section



def map_with_gradient(image: Tensor, stride: int) -> Tensor:
    """[B, 3C, h, w]: a map [B, C, h, w] and its image gradient d/du, d/dv (per image pixel;
    central differences, the edges replicated), stacked for sample_map."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / (2.0 * stride)
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / (2.0 * stride)
    return torch.cat([image, gx, gy], 1)


def sample_map(stack: Tensor, uv: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear samples of map_with_gradient's stack.

    Args:
        stack: [B, 3C, h, w]; map pixel (i, j) is centred at image coordinates
            ((j + 0.5) stride, (i + 0.5) stride) (pixel_grid's convention).
        uv: [B, N, 2] image coordinates (x, y) in full-resolution pixels.
        stride: image pixels per map pixel.
    Returns:
        values, d values / du, d values / dv ([B, N, C] each) and inside [B, N] bool (within the
        map's pixels; the border half pixel repeats the edge).
    """
    B, C3, h, w = stack.shape
    C = C3 // 3
    col = uv[..., 0] / stride - 0.5
    row = uv[..., 1] / stride - 0.5
    grid = torch.stack([2.0 * col / max(w - 1, 1) - 1.0, 2.0 * row / max(h - 1, 1) - 1.0], -1)
    out = F.grid_sample(stack, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=True)
    out = out[..., 0].transpose(1, 2)  # [B, N, 3C]
    inside = (col >= -0.5) & (col <= w - 0.5) & (row >= -0.5) & (row <= h - 0.5)
    return out[..., :C], out[..., C:2 * C], out[..., 2 * C:], inside


def projection_jacobian(y: Tensor, fx: Tensor, fy: Tensor) -> Tensor:
    """[..., 2, 6]: d(u, v) of the pinhole projection of camera-frame points y [..., 3] (z > 0)
    with respect to a local pose increment (rotation w first): exp(-step) y = y + [y]x w - v to
    first order. fx, fy broadcast against y[..., 0]."""
    x, yy, z = y.unbind(-1)
    iz = 1.0 / z
    a, b = x * iz, yy * iz
    zero = torch.zeros_like(a)
    du = torch.stack([fx * a * b, -fx * (1 + a * a), fx * b, -fx * iz, zero, fx * a * iz], -1)
    dv = torch.stack([fy * (1 + b * b), -fy * a * b, -fy * a, zero, -fy * iz, fy * b * iz], -1)
    return torch.stack([du, dv], -2)


def warp_equations(stack: Tensor, stride: int, K: Tensor, poses: Tensor, points: Tensor, values: Tensor,
                   valid: Tensor, scale2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Robust loss and normal equations of the warp residual at candidate query poses.

    Args:
        stack: [B, 3C, h, w] the query's map at `stride` with its gradient (map_with_gradient);
            K: [B, 3, 3] full-resolution intrinsics.
        poses: [B, 4, 4] candidate camera-to-world poses of the queries.
        points: [B, N, 3] world points of the keyframe's pixels; values: [B, N, C] rendered there.
        valid: [B, N] bool, pixels with a surface; scale2: [B] squared Cauchy scale.
    Returns:
        loss [B] (mean Cauchy penalty over the valid points; a point the candidate sees outside the
        map, or behind it, is charged the keyframe's median residual, scale2 / 2: leaving the
        view neither pays nor costs, as the first step off a keyframe's border must not),
        J^T W J [B, 6, 6] and J^T W r [B, 6] for a local increment P -> P @ se3_exp(step)
        (rotation first).
    """
    y = world_to_camera(points, poses)  # [B, N, 3]
    front = y[..., 2] > 1e-6
    y = torch.where(front[..., None], y, torch.ones_like(y))  # behind the camera: masked below
    fx, fy = K[:, None, 0, 0], K[:, None, 1, 1]
    uv = torch.stack([fx * y[..., 0] / y[..., 2] + K[:, None, 0, 2], fy * y[..., 1] / y[..., 2] + K[:, None, 1, 2]], -1)
    sampled, du, dv, inside = sample_map(stack, uv, stride)
    residual = sampled - values
    seen = valid & front & inside
    c2 = scale2[:, None]
    r2 = torch.where(seen, residual.pow(2).sum(-1), (0.5 * c2).expand_as(seen))
    loss = (torch.log1p(r2 / c2) * valid).sum(1) / valid.sum(1).clamp_min(1) * scale2
    weight = (seen / (1.0 + r2 / c2)).to(residual.dtype)  # IRLS weights of the Cauchy penalty
    # J = g @ P per channel (g = [du, dv] the map's gradient, P = d(u, v) / d step), so
    # J^T W J = sum P^T (w g^T g) P: a 2x2 structure tensor per point instead of C rows.
    P = projection_jacobian(y, fx, fy)  # [B, N, 2, 6]
    g = torch.stack([du, dv], -1) * weight[..., None, None]  # [B, N, C, 2]
    G = torch.einsum("bnca,bncd->bnad", g, torch.stack([du, dv], -1))  # [B, N, 2, 2]
    e = torch.einsum("bnca,bnc->bna", g, residual)  # [B, N, 2]
    return loss, torch.einsum("bnai,bnad,bndj->bij", P, G, P), torch.einsum("bnai,bna->bi", P, e)


def unit(x: Tensor, dim: int) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-6)


def keyframe_pixels(query: Tensor, height: int, width: int, stride: int, signal: str, max_rays: int) -> Tensor:
    """[B, N, 2] image coordinates a phase renders its keyframes at. Features: every pixel of the
    stride grid (the Feature Fusion module needs the whole map, a regular grid). RGB: at most max_rays (0: all),
    the most textured of each block of the query map [B, C, h, w] (the pose is close, so the
    query's texture marks the keyframe's)."""
    B = query.shape[0]
    if signal == "rgb" and 0 < max_rays < query.shape[-2] * query.shape[-1]:
        return textured_pixels(query, stride, max_rays)[0]
    return pixel_grid(height, width, stride, device=query.device).reshape(1, -1, 2).expand(B, -1, 2)


def render_keyframe(model, K: Tensor, c2w: Tensor, pixels: Tensor, stack: Tensor, height: int, width: int,
                    stride: int, signal: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The field at poses c2w [B, 4, 4] through pixels [B, N, 2] (keyframe_pixels), no gradients:
    (world points [B, N, 3], values [B, N, C] (unit vectors for features), valid [B, N] bool,
    squared residuals [B, N] and loss [B] against the query's map (stack: map_with_gradient):
    the cosine loss for features, the mean squared error per channel for RGB). Each keyframe
    marches its rays afresh: surface-band sampling (fastnefes.refine.surface) measured slower
    here, since keyframes move farther apart than the band follows."""
    from fastnefes.render import render_pixels

    B = c2w.shape[0]
    with torch.no_grad():
        if signal == "rgb":
            out = render_pixels(model, K, c2w, pixels[:, :, None, :], fused=False, with_features=False)
            values = out["rgb"][:, :, 0]
        else:
            h, w = height // stride, width // stride
            out = render_pixels(model, K, c2w, pixels.reshape(B, h, w, 2), fused=True)
            values = unit(out["fused"].reshape(B, h * w, -1), -1)
        depth, opacity = out["depth"].reshape(B, -1), out["opacity"].reshape(B, -1)
        points = backproject(pixels[:, :, None, :], depth[:, :, None], K, c2w)[:, :, 0]
        sampled, _, _, inside = sample_map(stack, pixels, stride)
        r2 = (sampled - values).pow(2).sum(-1)
        loss = r2.mean(1) / (2.0 if signal != "rgb" else values.shape[-1])
    return points, values, (opacity > 0.5) & (depth > 0) & inside, r2, loss


def clipped(step: Tensor, bound: Tensor) -> Tensor:
    """Increments [B, 6] scaled down (whole) to fit bound [B, 6] coordinate by coordinate."""
    return step / (step.abs() / bound).amax(1, keepdim=True).clamp_min(1.0)


def solve_on_keyframe(stack: Tensor, stride: int, K: Tensor, poses: Tensor, points: Tensor, values: Tensor,
                      valid: Tensor, r2: Tensor, iters: int, tol: Tensor, max_step: Tensor, damping: float,
                      stop_px: float = 0.0) -> tuple[Tensor, Tensor]:
    """Damped Gauss-Newton on the warp residual from the keyframe poses [B, 4, 4] (render_keyframe's
    points, values, valid, r2; stack: the query maps, map_with_gradient).

    The warp is only a model of the next render (its depth, occlusions and the bilinear
    interpolant's kinks at the keyframe's pixel centres are approximations), so its steps are
    not judged here: the renders judge the solves (direct_alignment_phase's trust region). Every
    query steps in lockstep (an evaluation is a grid_sample: no gathering of rows), damped by
    `damping` times diag(J^T J) (Marquardt's scaling), each step fitted to max_step [6], until
    every query's step is within tol [6] or moves the image by at most stop_px pixels. Returns
    ([B, 6] the solved increment on poses, [B] bool failed: non-finite normal equations).
    """
    scale2 = cauchy_scale(r2, valid)
    B, dev = poses.shape[0], poses.device
    current = poses
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    # A step's image motion, bounded: f |w| + f |v| / z (z the keyframe's median depth).
    z = world_to_camera(points, poses)[..., 2]
    z_med = torch.nanmedian(torch.where(valid & (z > 0), z, torch.full_like(z, math.nan)), 1).values
    focal = K[:, 0, 0]
    inv_depth = 1.0 / torch.nan_to_num(z_med, nan=1.0).clamp_min(1e-6)
    for _ in range(iters):
        _, A, g = warp_equations(stack, stride, K, current, points, values, valid, scale2)
        failed |= ~torch.isfinite(A).flatten(1).all(1) | ~torch.isfinite(g).all(1)
        diag = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
        system = (A + torch.diag_embed(damping * diag)).double()
        step = -torch.linalg.solve(system, torch.nan_to_num(g).double()[..., None])[..., 0].float()
        step = clipped(torch.where(failed[:, None], torch.zeros_like(step), torch.nan_to_num(step)),
                       max_step.expand_as(step))
        current = current @ se3_exp(step)
        moves = focal * (step[:, :3].norm(dim=1) + step[:, 3:].norm(dim=1) * inv_depth)
        if bool(((step.abs() <= tol).all(1) | (moves <= stop_px)).all()):
            break
    total = se3_log(torch.linalg.inv(poses) @ current)
    return torch.where(failed[:, None], torch.zeros_like(total), total), failed.cpu()


def mean_shift(K: Tensor, poses: Tensor, step: Tensor, points: Tensor, valid: Tensor) -> Tensor:
    """[B] mean distance in image pixels that the valid [B, N] world points [B, N, 3] move in
    cameras poses [B, 4, 4] when these move by local increments step [B, 6]."""
    def project(c2w: Tensor) -> Tensor:
        y = world_to_camera(points, c2w)
        z = y[..., 2].clamp_min(1e-6)
        return torch.stack([K[:, None, 0, 0] * y[..., 0] / z, K[:, None, 1, 1] * y[..., 1] / z], -1)

    shift = (project(poses @ se3_exp(step)) - project(poses)).norm(dim=-1)
    return (shift * valid).sum(1) / valid.sum(1).clamp_min(1)


def cauchy_scale(r2: Tensor, valid: Tensor) -> Tensor:
    """[B] squared Cauchy scale: twice the median squared residual [B, N] over the valid [B, N]
    pixels of a keyframe at its own pose (the field's typical misfit there), floored above 0."""
    med = torch.nanmedian(torch.where(valid, r2, torch.full_like(r2, math.nan)), dim=1).values
    return torch.nan_to_num(2.0 * med, nan=1.0).clamp_min(1e-4)


def direct_alignment_phase(model, K: Tensor, init: Tensor, query: Tensor, height: int, width: int, stride: int,
                           signal: str, renders: int, iters: int, delta: Tensor, failed: Tensor, counts: Tensor,
                           tol: Tensor, max_step: Tensor, damping: float = 1e-2, max_rays: int = 0,
                           progress: Optional[Callable[[int], None]] = None,
                           pixel_tol: float = 0.03, reach: float = 4.0, max_halvings: int = 3) -> Tensor:
    """Direct alignment of queries against keyframes rendered at their current poses.

    Args:
        K: [B, 3, 3]; init: [B, 4, 4] poses that delta [B, 6] (updated in place) is an increment on.
        query: [B, C, h, w] the queries' maps at stride (features or colours).
        signal: "features" or "rgb"; renders: keyframe renders per query at most (the last one
            judges the final solve); iters: Gauss-Newton iterations per keyframe.
        failed [B] is marked on non-finite values; counts [B] counts renders.
        tol [6]: a solve moving less than this (each coordinate), or moving the keyframe's points
            by less than pixel_tol map pixels on average, ends the query, converged (a
            finer level or the next phase takes over from there).
        max_step [6]: trust region of one Gauss-Newton step; a keyframe's whole solve moves at
            most max_step times a radius in [.., reach] that doubles after a better keyframe
            and shrinks 4x (the query pulled back towards its best pose) after a worse one,
            at most max_halvings times.
        max_rays: rgb only, the most keyframe pixels per query (0: every pixel of the grid).
    Returns:
        [B] bool, the queries that converged.
    """
    B, dev = delta.shape[0], delta.device
    target = query if signal == "rgb" else unit(query, 1)
    stack = map_with_gradient(target, stride)
    pixels = keyframe_pixels(target, height, width, stride, signal, max_rays)
    current = init @ se3_exp(delta)
    best_pose, best_loss = current.clone(), torch.full((B,), math.inf, device=dev)
    active = ~failed.clone()
    converged = torch.zeros(B, dtype=torch.bool)
    halvings = torch.zeros(B, dtype=torch.long)
    radius = torch.ones(B, device=dev)  # a keyframe's solve moves at most max_step * radius
    moved_on = torch.zeros(B, dtype=torch.bool, device=dev)  # the best keyframe is not the first
    for n in range(renders):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        rd = rows.to(dev)
        points, values, valid, r2, loss = render_keyframe(model, K[rd], current[rd], pixels[rd], stack[rd],
                                                          height, width, stride, signal)
        counts[rows] += 1
        bad = ~torch.isfinite(loss).cpu()
        better = (loss < best_loss[rd]).cpu() & ~bad
        keep = rows[better].to(dev)
        best_pose[keep], best_loss[keep] = current[keep], loss[better.to(dev)]
        moved_on[keep] = n > 0
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
            towards = 0.5 * se3_log(torch.linalg.inv(best_pose[b]) @ current[b])  # at least halfway back
            current[b] = best_pose[b] @ se3_exp(clipped(towards, max_step * radius[b, None]))
            halvings[b.cpu()] += 1
        go = (~stop).to(dev)
        if bool(go.any()):
            g = rd[go]
            with section("optimizer_step"):
                moved, solve_failed = solve_on_keyframe(stack[g], stride, K[g], current[g], points[go], values[go],
                                                        valid[go], r2[go], iters, tol, max_step, damping,
                                                        0.1 * pixel_tol * stride)
            moved = clipped(moved, max_step * radius[g, None])
            shift = mean_shift(K[g], current[g], moved, points[go], valid[go])
            small = ((moved.abs() <= tol).all(1) | (shift <= pixel_tol * stride)).cpu()
            current[g] = current[g] @ se3_exp(moved)
            converged[g[small].cpu()] = True
            active[g[small | solve_failed].cpu()] = False
        failed[rows[bad]] = True
        active[rows[bad | (halvings[rows] > max_halvings)]] = False
        if progress:
            progress(int((~active).sum()))
    # A query whose best keyframe was its first keeps its incoming increment exactly.
    done = torch.isfinite(best_loss) & moved_on
    if bool(done.any()):
        delta[done] = se3_log(torch.linalg.inv(init[done]) @ best_pose[done])
    return converged
