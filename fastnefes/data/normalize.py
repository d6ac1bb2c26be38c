"""Automatic scene normalisation: a centre and scale that map the scene into the unit cube,
and the parametrisation of the space around it.

The feature field lives in [0, 1]^3 (the hash grid's domain). `compute_normalization` finds
the world-space box holding the scene's content, from the best evidence the scene has:

1. depth maps (7-Scenes, synthetic scenes): back-projected depth of up to `max_images` views;
2. sparse points (COLMAP, Cambridge NVM): points seen by at least one sampled camera;
3. silhouettes: cameras looking inwards at an object on a uniform background (composited
   renders): the intersection of the view frusta carved by the silhouettes, the visual hull;
4. points triangulated from the images themselves (phone captures in transforms json carry
   neither depth nor points): feature matches between neighbouring views, triangulated with
   the known poses (fastnefes.data.triangulate), then as 2;
5. otherwise: the intersection of the view frusta (cameras looking inwards), or the camera
   centres plus a viewing distance the size of the camera spread.

The space (fastnefes.field.space) follows from the same evidence: "bounded" where the box
holds the content (depth, silhouettes, points whose depths are not spread far beyond the
typical one), "contracted" where content reaches far beyond the box (points far behind the
typical depth: outdoor scenes; forward-facing captures, whose far content has too little
parallax to triangulate) or nothing bounds it (frusta without
silhouettes, cameras only); the box is then the foreground.

Outliers are handled with per-axis percentiles (depth, points) and a median-distance test on
camera centres. Nothing is tuned per scene. near/far (world units) are what a renderer should
march between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

DEPTH_PERCENTILES = (0.1, 99.9)
POINT_PERCENTILES = (1.0, 99.0)
# Points whose 95th-percentile depth exceeds this many times the median depth reach far
# beyond the typical content (streets and sky, forward-facing captures): contracted space.
FAR_DEPTH_RATIO = 2.5
MIN_POINTS = 64
# Forward-facing: optical axes within about 25 degrees of their mean (|mean axis| > 0.9), the
# camera centres spread over less than 0.35 x the median depth of what they see.
FORWARD_AXIS = 0.9
FORWARD_SPREAD = 0.35


@dataclass
class SceneNormalization:
    """x_unit = (x_world - center) * scale + 0.5.

    center: [3] world point mapped to the cube centre; scale: world -> unit factor;
    near, far: ray range in world units; source: which evidence set the bounds; space: the
    parametrisation the evidence calls for ("bounded" or "contracted", fastnefes.field.space).
    """

    center: np.ndarray
    scale: float
    near: float
    far: float
    source: str = ""
    space: str = "bounded"

    def to_unit(self, x):
        """World points [..., 3] (numpy or torch) -> unit-cube coordinates."""
        center = _like(self.center, x)
        return (x - center) * self.scale + 0.5

    def from_unit(self, u):
        """Unit-cube coordinates [..., 3] -> world points."""
        center = _like(self.center, u)
        return (u - 0.5) / self.scale + center

    @property
    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space corners (min [3], max [3]) of the unit cube."""
        half = 0.5 / self.scale
        return self.center - half, self.center + half

    def to_dict(self) -> dict:
        return {
            "center": [float(v) for v in self.center],
            "scale": float(self.scale),
            "near": float(self.near),
            "far": float(self.far),
            "source": self.source,
            "space": self.space,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SceneNormalization":
        return cls(np.asarray(d["center"], dtype=np.float64).reshape(3), float(d["scale"]), float(d["near"]),
                   float(d["far"]), str(d.get("source", "")), str(d.get("space", "bounded")))


def _like(value: np.ndarray, x):
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return value


def backproject_depth(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World points [M, 3] and their pixel coordinates [M, 2] (x, y) from a z-depth map [H, W]
    (0 = invalid), sampling pixel centres every `stride` pixels."""
    h, w = depth.shape
    ii, jj = np.mgrid[stride // 2 : h : stride, stride // 2 : w : stride]
    z = depth[ii, jj].astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    x = (jj[valid] + 0.5 - K[0, 2]) / K[0, 0]
    y = (ii[valid] + 0.5 - K[1, 2]) / K[1, 1]
    cam = np.stack([x, y, np.ones_like(x)], -1) * z[valid][:, None]
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    return world, np.stack([jj[valid] + 0.5, ii[valid] + 0.5], -1)


def project(points: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [M, 2] and camera z [M] of world points [M, 3]."""
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = cam[:, 2]
    safe = np.where(np.abs(z) < 1e-12, 1e-12, z)
    uv = cam[:, :2] / safe[:, None] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return uv, z


def evenly_spaced(indices: Sequence[int], count: int) -> list[int]:
    indices = list(indices)
    if len(indices) <= count:
        return indices
    return [indices[int(k)] for k in np.linspace(0, len(indices) - 1, count).round()]


def compute_normalization(
    scene,
    margin: float = 0.05,
    *,
    indices: Optional[Sequence[int]] = None,
    max_images: int = 64,
    points_per_image: int = 4096,
    max_points: int = 50000,
) -> SceneNormalization:
    """Centre, scale and near/far for `scene` (see the module docstring).

    The content box's longest side maps to [margin, 1 - margin]. `indices` are the images whose
    evidence counts (default: the train split, or all images if it is empty); at most
    `max_images` of them are read, `points_per_image` depth samples each, `max_points` sparse
    points in all.
    """
    if indices is None:
        indices = scene.split("train") or list(range(len(scene)))
    indices = list(indices)
    sample = evenly_spaced(indices, max_images)
    centres = scene.c2w[indices, :3, 3]
    cams = _robust_cameras(centres)

    if scene.depth_fn is not None:
        box, z = _depth_box(scene, sample, points_per_image)
        if box is not None:
            return _finish(_union(box, cams), scene, indices, margin, near=0.5 * np.percentile(z, 1.0), source="depth")
    if scene.points is not None and len(scene.points) >= MIN_POINTS:
        found = _from_points(scene, np.asarray(scene.points, dtype=np.float64).reshape(-1, 3), sample, cams, indices,
                             margin, max_points, "points")
        if found is not None:
            return found
    frusta = _frusta_box(scene, evenly_spaced(indices, 48))
    if frusta is not None and frusta[1] == "silhouettes":
        return _finish(frusta[0], scene, indices, margin, near=None, source="silhouettes")
    from fastnefes.data.triangulate import triangulate_scene

    found = _from_points(scene, triangulate_scene(scene, indices), sample, cams, indices, margin, max_points,
                         "triangulated")
    if found is not None:
        return found
    if frusta is not None:  # an object seen from around it, with a background beyond
        return _finish(frusta[0], scene, indices, margin, near=None, source="frusta", space="contracted")
    dirs = scene.c2w[indices, :3, 2]
    reach = max(float(np.max(cams.max(0) - cams.min(0))), 1e-6)
    box = _union(np.stack([cams.min(0), cams.max(0)]), centres + dirs * reach)
    return _finish(box, scene, indices, margin, near=0.01 * reach, source="cameras", space="contracted")


def _from_points(scene, points, sample, cams, indices, margin, max_points, source) -> Optional[SceneNormalization]:
    """Normalisation from sparse points [M, 3] (None when too few are seen): bounded around
    them, or contracted around the cameras and the nearer half of the content when the far
    points lie well beyond the typical depth."""
    if len(points) < MIN_POINTS:
        return None
    if len(points) > max_points:  # percentiles need no more; keeps large models fast
        points = points[np.random.default_rng(0).choice(len(points), max_points, replace=False)]
    seen, z = _seen_points(scene, points, sample)
    if seen.sum() < MIN_POINTS:
        return None
    near = 0.5 * np.percentile(z, 1.0)
    z50, z95 = np.percentile(z, [50.0, 95.0])
    if z95 <= FAR_DEPTH_RATIO * z50 and not _forward_facing(scene.c2w[indices], cams, z50):
        box = np.percentile(points[seen], POINT_PERCENTILES, axis=0)
        return _finish(_union(box, cams), scene, indices, margin, near=near, source=source)
    nearer = _seen_points(scene, points, sample, max_depth=z50)[0]
    box = np.percentile(points[nearer], POINT_PERCENTILES, axis=0) if nearer.sum() >= 8 else np.stack([cams.min(0), cams.max(0)])
    return _finish(_union(box, cams), scene, indices, margin, near=near, source=source, space="contracted")


def _robust_cameras(centres: np.ndarray) -> np.ndarray:
    """Camera centres [N, 3] without gross outliers (beyond 10x the median distance to the median)."""
    med = np.median(centres, axis=0)
    dist = np.linalg.norm(centres - med, axis=1)
    keep = dist <= 10.0 * np.median(dist) + 1e-9 * (1.0 + np.abs(med).max())
    return centres[keep]


def _union(box: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Box [2, 3] (min, max) grown to hold points [M, 3]."""
    if len(points) == 0:
        return box
    return np.stack([np.minimum(box[0], points.min(0)), np.maximum(box[1], points.max(0))])


def _finish(box, scene, indices, margin, near, source, space: str = "bounded") -> SceneNormalization:
    lo, hi = box
    extent = float(np.max(hi - lo))
    if not extent > 0:
        extent = 1.0
    scale = (1.0 - 2.0 * margin) / extent
    centres = scene.c2w[indices, :3, 3]
    # far: the farthest corner of the whole cube (not just the content box) from any camera
    corners = (lo + hi) / 2.0 + (np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T * 0.5 / scale)
    far = float(np.max(np.linalg.norm(corners[None] - centres[:, None], axis=-1)))
    if near is None:  # cameras outside the box: half the closest approach to it (query
        # cameras may come closer than the training ones)
        gap = np.linalg.norm(np.maximum(0, np.maximum(lo - centres, centres - hi)), axis=1)
        near = 0.5 * float(gap.min())
    near = float(max(near, 1e-3 * extent))
    return SceneNormalization(center=(lo + hi) / 2.0, scale=scale, near=near, far=far, source=source, space=space)


def _depth_box(scene, sample, points_per_image):
    pts, zs = [], []
    for i in sample:
        depth = scene.depth(i)
        if depth is None:
            continue
        stride = max(1, int(np.sqrt(depth.size / points_per_image)))
        world, _ = backproject_depth(depth, scene.K[i], scene.c2w[i], stride)
        pts.append(world)
        z = depth[stride // 2 :: stride, stride // 2 :: stride]
        zs.append(z[np.isfinite(z) & (z > 0)])
    if not pts or sum(len(p) for p in pts) == 0:
        return None, None
    pts = np.concatenate(pts)
    return np.percentile(pts, DEPTH_PERCENTILES, axis=0), np.concatenate(zs)


def _forward_facing(c2w: np.ndarray, cams: np.ndarray, typical_depth: float) -> bool:
    """Cameras [N, 4, 4] that all look one way from a patch small against the depth they see
    (LLFF-style captures): what lies beyond the triangulated points (too little parallax to
    triangulate) is still in view, so the space must reach past them."""
    axis = np.linalg.norm(c2w[:, :3, 2].mean(0))
    spread = float(np.max(cams.max(0) - cams.min(0))) if len(cams) else 0.0
    return axis > FORWARD_AXIS and spread < FORWARD_SPREAD * typical_depth


def _seen_points(scene, points, sample, max_depth: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """[M] bool of the points seen (in front, inside the image, no deeper than max_depth) by at
    least one sampled camera, and the depths [K] of every such sighting."""
    seen = np.zeros(len(points), bool)
    zs = []
    for i in sample:
        uv, z = project(points, scene.K[i], scene.c2w[i])
        h, w = scene.hw[i]
        vis = (z > 0) & (z <= max_depth) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        seen |= vis
        zs.append(z[vis])
    return seen, np.concatenate(zs) if zs else np.zeros(0)


def convergence_point(c2w: np.ndarray) -> Optional[np.ndarray]:
    """Least-squares point closest to all optical axes [N, 4, 4]; None if they are near parallel."""
    d = c2w[:, :3, 2]
    c = c2w[:, :3, 3]
    P = np.eye(3)[None] - d[:, :, None] * d[:, None, :]
    A = P.sum(0)
    eig = np.linalg.eigvalsh(A)
    if eig[0] < 1e-3 * eig[-1]:
        return None
    return np.linalg.solve(A, (P @ c[:, :, None]).sum(0)[:, 0])


def _silhouette(image: np.ndarray) -> Optional[np.ndarray]:
    """[H, W] bool mask of the pixels that differ from a uniform border colour (grown by one
    pixel, to stay conservative), or None when the border is not (almost) one colour or
    nothing differs from it."""
    import cv2

    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int32)
    colours, counts = np.unique(border, axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    if np.mean(np.abs(border - bg).max(-1) <= 3) < 0.98:
        return None
    fg = (np.abs(image.astype(np.int32) - bg).max(-1) > 3).astype(np.uint8)
    if not fg.any():
        return None
    return cv2.dilate(fg, np.ones((3, 3), np.uint8)).astype(bool)


def _inside_all(points: np.ndarray, scene, cams: list[int], masks: list[Optional[np.ndarray]]) -> np.ndarray:
    """[M] bool: points inside every camera's view frustum and, where the camera has a
    silhouette mask, projecting onto it. Only surviving points are tested."""
    alive = np.arange(len(points))
    for i, mask in zip(cams, masks):
        K, c2w = scene.K[i], scene.c2w[i]
        h, w = scene.hw[i]
        cam = (points[alive] - c2w[:3, 3]) @ c2w[:3, :3]
        z = np.maximum(cam[:, 2], 1e-12)
        u = K[0, 0] * cam[:, 0] / z + K[0, 2]
        v = K[1, 1] * cam[:, 1] / z + K[1, 2]
        ok = (cam[:, 2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        if mask is not None:
            ok[ok] = mask[v[ok].astype(np.int64), u[ok].astype(np.int64)]
        alive = alive[ok]
    inside = np.zeros(len(points), bool)
    inside[alive] = True
    return inside


def _frusta_box(scene, cams: list[int], res: int = 40, rounds: int = 4):
    """Bounding box [2, 3] of the intersection of the cameras' view frusta (carved by the
    silhouettes where the background is uniform: the visual hull), by refining a point grid;
    None unless the cameras look inwards at a common, bounded region."""
    c2w = scene.c2w[cams]
    x_star = convergence_point(c2w)
    if x_star is None:
        return None
    facing = 0
    for i in cams:
        uv, z = project(x_star[None], scene.K[i], scene.c2w[i])
        h, w = scene.hw[i]
        facing += bool(z[0] > 0 and 0 <= uv[0, 0] <= w and 0 <= uv[0, 1] <= h)
    if facing < 0.9 * len(cams):
        return None
    masks = [_silhouette(scene.image_fn(i)) for i in cams]
    n_sil = sum(m is not None for m in masks)
    radius = float(np.max(np.linalg.norm(c2w[:, :3, 3] - x_star, axis=1)))
    start = np.stack([x_star - radius, x_star + radius])
    box = start
    for k in range(rounds):
        axes = [np.linspace(box[0, a], box[1, a], res) for a in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        inside = _inside_all(grid, scene, cams, masks)
        if not inside.any():
            return None
        lo, hi = grid[inside].min(0), grid[inside].max(0)
        if k == 0 and (np.any(lo <= start[0]) or np.any(hi >= start[1])):
            return None  # reaches the search region's edge: not a bounded, inward-looking setup
        cell = (box[1] - box[0]) / (res - 1)
        box = np.stack([lo - cell, hi + cell])
    return box, ("silhouettes" if n_sil >= len(cams) // 2 else "frusta")
