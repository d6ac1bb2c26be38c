"""Rotation search: a global start for the feature phase from one widened render per query.

The feature phase is a local search, and its basin ends roughly where the rendered view stops
overlapping the query's: about 5 deg on a 40 deg lego camera. But turning a camera about its
centre moves its image almost rigidly, so one render with a wider field of view (`pad` cells
more on every side) holds the view of every nearby rotation. The query's feature map (turned by
a few roll angles) is correlated with every window of that render, the feature loss at each
shift in one grouped convolution, and the camera turns so that the best window becomes its
view: the rotation that maps the query's rays onto that window's rays (Kabsch). The search costs
one render; the caller keeps its pose only where an ordinary render there has a lower loss.
Goes beyond NeFeS, which optimises from the initial pose only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastnefes.geometry import camera_directions, pixel_grid


def window_losses(rendered: torch.Tensor, query: torch.Tensor, valid: torch.Tensor, signal: str) -> torch.Tensor:
    """The loss of the query against every window of a wider rendered map.

    Args:
        rendered: [B, C, h + 2 ph, w + 2 pw] rendered map.
        query: [B, C, h, w] query map (zero where not valid).
        valid: [B, 1, h, w] float, 1 where the query pixel counts.
        signal: "features" (1 - mean cosine similarity) or "rgb" (mean squared error).
    Returns:
        [B, 2 ph + 1, 2 pw + 1]: entry (u, v) compares the query with the window whose top-left
        corner is rendered cell (u, v); (ph, pw) is the unshifted view.
    """
    B, C = query.shape[:2]
    count = valid.flatten(1).sum(1).clamp_min(1.0)[:, None, None]

    def correlate(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:  # per-query kernels: groups = B
        k = kernel.shape[1]
        return F.conv2d(x.reshape(1, B * k, *x.shape[-2:]), kernel, groups=B)[0]

    if signal == "features":
        r = F.normalize(rendered, dim=1, eps=1e-6)
        q = F.normalize(query, dim=1, eps=1e-6) * valid
        return 1.0 - correlate(r, q) / count
    if signal == "rgb":
        q = query * valid
        r2 = correlate(rendered.pow(2).sum(1, keepdim=True), valid)  # sum of |r|^2 over each window's valid cells
        cross = correlate(rendered, q)
        q2 = q.pow(2).flatten(1).sum(1)[:, None, None]
        return (r2 - 2.0 * cross + q2) / (count * C)
    raise ValueError(f"unknown signal {signal!r} (expected 'features' or 'rgb')")


def turn_points(xy: torch.Tensor, cos: torch.Tensor | float, sin: torch.Tensor | float) -> torch.Tensor:
    """Points [..., 2] (x right, y down) turned by the angle with this cosine and sine about the
    origin: positive angles take x towards y (clockwise on screen)."""
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([cos * x - sin * y, sin * x + cos * y], -1)


def turn_map(query: torch.Tensor, angle_rad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The query map [B, C, h, w] turned by angle_rad about its centre (bilinear), and where it
    is defined: ([B, C, h, w], valid [B, 1, h, w] float)."""
    B, _, h, w = query.shape
    if angle_rad == 0.0:
        return query, torch.ones(B, 1, h, w, dtype=query.dtype, device=query.device)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    # grid_sample maps output -> input coordinates, so the inverse turn; pixel units keep the
    # angle true on non-square maps.
    scale = torch.tensor([w / 2.0, h / 2.0], dtype=query.dtype, device=query.device)
    base = pixel_grid(h, w, 1, device=query.device, dtype=query.dtype) - scale  # centred pixel coords
    src = turn_points(base, c, -s) / scale  # normalised [-1, 1]
    grid = src.expand(B, h, w, 2)
    turned = F.grid_sample(query, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = F.grid_sample(torch.ones_like(query[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    valid = (valid > 0.999).to(query.dtype)
    return turned * valid, valid


def rotation_between(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares rotations R [B, 3, 3] with R src_i ~ dst_i (Kabsch); src, dst [B, N, 3]."""
    cov = src.transpose(1, 2) @ dst  # [B, 3, 3] = sum_i src_i dst_i^T
    U, _, Vh = torch.linalg.svd(cov)
    V = Vh.transpose(1, 2)
    det = torch.linalg.det(V @ U.transpose(1, 2))
    D = torch.diag_embed(torch.stack([torch.ones_like(det), torch.ones_like(det), det], -1))
    return V @ D @ U.transpose(1, 2)


def window_turns(losses: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k lowest local minima of window losses [B, n_roll, U, V] (3x3 neighbourhoods, so the
    candidates are distinct views): (values [B, k], indices [B, k, 3] of (roll, u, v)); inf
    values where a query has fewer than k minima."""
    B, n_roll, U, V = losses.shape
    flat = losses.reshape(B * n_roll, 1, U, V)
    neighbourhood_min = -F.max_pool2d(-flat, 3, stride=1, padding=1)
    minima = torch.where(flat <= neighbourhood_min, flat, torch.full_like(flat, math.inf)).reshape(B, -1)
    values, index = minima.topk(min(k, minima.shape[1]), dim=1, largest=False)
    return values, torch.stack([index // (U * V), (index % (U * V)) // V, index % V], -1)


@torch.no_grad()
def search_rotation(model, query: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
                    stride: int, pad: float, roll_deg: tuple[float, ...] = (0.0,), candidates: int = 4,
                    signal: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """The best turns of each camera about its centre, by window_losses on one widened render.

    A window is only a first-order model of a turn (a wide-angle camera's image also stretches
    towards its edges, and a roll leaves the corners out of the comparison), so several distinct
    candidates are returned for the caller to judge by ordinary renders.

    Args:
        query: [B, C, h, w] query maps at `stride` (features, or RGB for signal "rgb").
        K: [B, 3, 3] full-resolution intrinsics; c2w: [B, 4, 4] current poses (OpenCV).
        pad: the widening on every side as a fraction of the map's width and height.
        roll_deg: roll angles tried about the optical axis (degrees).
        candidates: how many turns to return per query (the lowest local minima).
    Returns:
        (poses [B, k, 4, 4]: c2w turned to each candidate window, their window losses [B, k],
        lowest first; inf marks a query with fewer than k minima).
    """
    from fastnefes.render import render_image

    B, _, h, w = query.shape
    ph, pw = max(1, round(pad * h)), max(1, round(pad * w))
    K_wide = K.clone()
    K_wide[:, 0, 2] += pw * stride
    K_wide[:, 1, 2] += ph * stride
    out = render_image(model, K_wide, c2w, (h + 2 * ph) * stride, (w + 2 * pw) * stride, stride=stride,
                       fused=signal != "rgb")
    rendered = out["rgb" if signal == "rgb" else "fused"].permute(0, 3, 1, 2)
    rolls = torch.tensor([math.radians(r) for r in roll_deg], device=query.device)
    losses = torch.stack([window_losses(rendered, *turn_map(query, float(r)), signal) for r in rolls], 1)
    values, index = window_turns(losses, candidates)  # [B, k], [B, k, 3]
    k = values.shape[1]
    roll = rolls[index[..., 0]].reshape(-1, 1)  # [B k, 1]
    shift = torch.stack([index[..., 2] - pw, index[..., 1] - ph], -1).reshape(-1, 1, 2).to(query.dtype)
    # Query pixel p sees what the old camera sees at centre + turn(p - centre) + shift * stride.
    p = pixel_grid(h, w, stride, device=query.device).reshape(1, -1, 2)
    centre = torch.tensor([w * stride / 2.0, h * stride / 2.0], device=query.device)
    target = centre + turn_points(p - centre, torch.cos(roll), torch.sin(roll)) + shift * stride
    Kk = K.repeat_interleave(k, 0)[:, None]  # [B k, 1, 3, 3]
    src = F.normalize(camera_directions(Kk, p.expand(B * k, -1, -1)), dim=-1)
    dst = F.normalize(camera_directions(Kk, target), dim=-1)
    R = rotation_between(src, dst).reshape(B, k, 3, 3)
    poses = c2w[:, None].repeat(1, k, 1, 1)
    poses[..., :3, :3] = c2w[:, None, :3, :3] @ R.to(c2w.dtype)
    return poses, values
