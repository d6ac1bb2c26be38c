"""Match-then-solve initialisation: rendered features + depth against the query's features, PnP.

The feature-metric phase is a local search; from 20-30 cm / 10 deg it can settle in a wrong
basin. Here the field renders fused features and depth at the current pose, each rendered pixel
finds its mutual nearest neighbour among the query's feature cells (cosine similarity), the
rendered depth lifts it to a 3D point, and PnP + RANSAC (OpenCV) solves the query pose from those
2D-3D matches in one step. The pose is taken only with enough inliers and a lower feature loss
than the pose it started from, so it can only help; the feature phase and the photometric polish
then refine it. Goes beyond NeFeS (which optimises from the APR's pose only).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fastnefes.geometry import backproject, pixel_grid


def mutual_matches(rendered: torch.Tensor, query: torch.Tensor, valid: torch.Tensor,
                   min_similarity: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours by cosine similarity.

    Args:
        rendered: [N, D] rendered features; query: [M, D] query features; valid: [N] bool
            (rendered pixels that may match, e.g. opaque ones).
    Returns:
        (rendered indices [K], query indices [K]) of pairs that are each other's best match.
    """
    idx = valid.nonzero()[:, 0]
    if idx.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=rendered.device)
        return empty, empty
    sim = F.normalize(rendered[idx], dim=-1) @ F.normalize(query, dim=-1).t()  # [N', M]
    best_q = sim.argmax(1)
    best_r = sim.argmax(0)
    mutual = (best_r[best_q] == torch.arange(idx.numel(), device=sim.device))
    mutual &= sim.gather(1, best_q[:, None])[:, 0] > min_similarity
    return idx[mutual], best_q[mutual]


def solve_pnp(points3d: np.ndarray, points2d: np.ndarray, K: np.ndarray, reproj_px: float,
              min_inliers: int, seed: int = 0) -> tuple[np.ndarray | None, int]:
    """c2w [4,4] (float64) from 2D-3D matches by PnP + RANSAC (SQPnP minimal solver, then
    Levenberg-Marquardt on the inliers); (None, inliers) when fewer than min_inliers agree."""
    if len(points3d) < max(min_inliers, 6):
        return None, 0
    cv2.setRNGSeed(seed)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(points3d.astype(np.float64), points2d.astype(np.float64),
                                                 K.astype(np.float64), None, iterationsCount=300,
                                                 reprojectionError=float(reproj_px), confidence=0.999,
                                                 flags=cv2.SOLVEPNP_SQPNP)
    n = 0 if inliers is None else len(inliers)
    if not ok or n < min_inliers:
        return None, n
    idx = inliers[:, 0]
    rvec, tvec = cv2.solvePnPRefineLM(points3d[idx].astype(np.float64), points2d[idx].astype(np.float64),
                                      K.astype(np.float64), None, rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = -R.T @ tvec[:, 0]
    return c2w, n


@torch.no_grad()
def match_and_solve(model, query: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
                    stride: int, min_inliers: int = 12, reproj_factor: float = 1.5, min_opacity: float = 0.5
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """One round for a batch: render at c2w [B,4,4], match against the query maps [B,D,h,w]
    (same stride), PnP per query. Returns (poses [B,4,4]: the PnP pose where found, else c2w;
    inlier counts [B], 0 where no pose was found). reproj_px = reproj_factor * stride."""
    from fastnefes.render import render_image

    B = c2w.shape[0]
    out = render_image(model, K, c2w, height, width, stride=stride, fused=True)
    fused = out["fused"].flatten(1, 2)  # [B, N, D]
    depth, opacity = out["depth"].flatten(1, 2), out["opacity"].flatten(1, 2)
    pixels = pixel_grid(height, width, stride, device=c2w.device)
    h, w = pixels.shape[:2]
    points = backproject(pixels.expand(B, h, w, 2), out["depth"], K, c2w).flatten(1, 2)  # [B, N, 3]
    q = query[..., :h, :w].flatten(2).transpose(1, 2)  # [B, M, D]
    q_pixels = pixels.reshape(-1, 2)
    poses = c2w.clone()
    counts = np.zeros(B, dtype=np.int64)
    for b in range(B):
        valid = (opacity[b] > min_opacity) & (depth[b] > 0)
        r_idx, q_idx = mutual_matches(fused[b], q[b], valid)
        pose, n = solve_pnp(points[b, r_idx].double().cpu().numpy(), q_pixels[q_idx].double().cpu().numpy(),
                            K[b].double().cpu().numpy(), reproj_factor * stride, min_inliers)
        counts[b] = n if pose is not None else 0
        if pose is not None and np.isfinite(pose).all():
            poses[b] = torch.as_tensor(pose, dtype=poses.dtype, device=poses.device)
    return poses, counts
