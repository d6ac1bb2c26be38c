"""Sparse 3D points from posed images alone: feature matches between neighbouring views,
filtered by the known epipolar geometry, triangulated with the known poses.

Scenes from phone captures (transforms json) or pose lists carry neither depth nor a point
cloud, yet where the content lies decides the scene's bounds and parametrisation. The poses
are known, so no RANSAC is needed: a match is kept when it lies on its epipolar line (Sampson
distance), the rays meet at a usable angle in front of both cameras and the point reprojects.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

MAX_SIDE = 640  # images are matched at most this large: enough for bounds, fast on a CPU


def _gray(scene, i: int) -> tuple[np.ndarray, float]:
    """uint8 grey image of view i at most MAX_SIDE on its longer side, and its scale factor."""
    import cv2

    image = scene.image_fn(i)
    scale = min(1.0, MAX_SIDE / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), scale


def _projection(K: np.ndarray, c2w: np.ndarray, scale: float) -> np.ndarray:
    """3x4 projection matrix of a camera at an image scaled by `scale` (OpenCV pixel centres
    at integers, hence the half-pixel shift of the 0.5-centred K)."""
    Ks = np.diag([scale, scale, 1.0]) @ K
    Ks[0, 2] -= 0.5
    Ks[1, 2] -= 0.5
    w2c = np.linalg.inv(c2w)
    return Ks @ w2c[:3]


def _fundamental(P1: np.ndarray, P2: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """F with x2^T F x1 = 0 from two projection matrices (c1: camera 1's centre, homogeneous)."""
    e2 = P2 @ c1
    ex = np.array([[0, -e2[2], e2[1]], [e2[2], 0, -e2[0]], [-e2[1], e2[0], 0]])
    return ex @ P2 @ np.linalg.pinv(P1)


def _sampson(F: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Sampson distances [M] (pixels) of correspondences x1, x2 [M, 2]."""
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    h2 = np.concatenate([x2, np.ones((len(x2), 1))], 1)
    Fx1, Ftx2 = h1 @ F.T, h2 @ F
    num = np.einsum("ij,ij->i", h2, Fx1) ** 2
    den = Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2
    return np.sqrt(num / np.maximum(den, 1e-12))


def neighbour_pairs(c2w: np.ndarray, per_view: int = 2, max_angle_deg: float = 45.0,
                    min_baseline: float = 0.0) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of views [N, 4, 4] to match: each view with its `per_view` nearest
    cameras (by centre distance) at least min_baseline away whose optical axes differ by less
    than max_angle_deg."""
    centres, axes = c2w[:, :3, 3], c2w[:, :3, 2]
    cos_max = np.cos(np.radians(max_angle_deg))
    pairs = set()
    for i in range(len(c2w)):
        dist = np.linalg.norm(centres - centres[i], axis=1)
        ok = (axes @ axes[i] > cos_max) & (dist > max(min_baseline, 0.0))
        for j in np.argsort(np.where(ok, dist, np.inf))[:per_view]:
            if ok[j]:
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


class PairMatches(NamedTuple):
    """The triangulated matches of views i and j: pixel coordinates x_i, x_j [M, 2] at the
    scene's loaded resolution (0.5-centred, as K), the keypoints' indices in their view's
    detections k_i, k_j [M], world points [M, 3] (dataset frame)."""
    i: int
    j: int
    x_i: np.ndarray
    x_j: np.ndarray
    k_i: np.ndarray
    k_j: np.ndarray
    points: np.ndarray


def triangulated_pairs(scene, views: Sequence[int], features: int = 3000, max_sampson_px: float = 1.5,
                       max_reproj_px: float = 2.0, min_angle_deg: float = 1.0, per_view: int = 2,
                       min_baseline: float = 0.0):
    """Yield PairMatches for the neighbouring pairs of `views`: the matches of views i and j
    that survive the epipolar, cheirality, reprojection and angle tests."""
    import cv2

    orb = cv2.ORB_create(nfeatures=features)
    cache: dict[int, tuple] = {}

    def detect(i: int):
        if i not in cache:
            gray, scale = _gray(scene, i)
            kps, desc = orb.detectAndCompute(gray, None)
            pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
            cache[i] = (pts, desc, _projection(scene.K[i], scene.c2w[i], scale), scale)
        return cache[i]

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    for a, b in neighbour_pairs(scene.c2w[list(views)], per_view, min_baseline=min_baseline):
        i, j = views[a], views[b]
        (p1, d1, P1, s1), (p2, d2, P2, s2) = detect(i), detect(j)
        if d1 is None or d2 is None or len(p1) < 8 or len(p2) < 8:
            continue
        matches = matcher.match(d1, d2)
        if len(matches) < 8:
            continue
        k1 = np.array([m.queryIdx for m in matches])
        k2 = np.array([m.trainIdx for m in matches])
        x1, x2 = p1[k1], p2[k2]
        c1 = np.append(scene.c2w[i][:3, 3], 1.0)
        keep = _sampson(_fundamental(P1, P2, c1), x1, x2) < max_sampson_px
        if keep.sum() < 8:
            continue
        x1, x2, k1, k2 = x1[keep], x2[keep], k1[keep], k2[keep]
        X = cv2.triangulatePoints(P1, P2, x1.T, x2.T)
        X = (X[:3] / np.where(np.abs(X[3]) < 1e-12, 1e-12, X[3])).T
        good = np.ones(len(X), bool)
        for P, x in ((P1, x1), (P2, x2)):
            h = np.concatenate([X, np.ones((len(X), 1))], 1) @ P.T
            good &= h[:, 2] > 0
            good &= np.linalg.norm(h[:, :2] / np.where(np.abs(h[:, 2:]) < 1e-12, 1e-12, h[:, 2:]) - x, axis=1) < max_reproj_px
        r1 = X - scene.c2w[i][:3, 3]
        r2 = X - scene.c2w[j][:3, 3]
        cos = np.einsum("ij,ij->i", r1, r2) / np.maximum(np.linalg.norm(r1, axis=1) * np.linalg.norm(r2, axis=1), 1e-12)
        good &= cos < np.cos(np.radians(min_angle_deg))
        # OpenCV's integer-centred coordinates at the matching scale -> 0.5-centred at the loaded one
        yield PairMatches(i, j, (x1[good] + 0.5) / s1, (x2[good] + 0.5) / s2, k1[good], k2[good], X[good])


def triangulate_scene(scene, indices: Sequence[int], max_views: int = 24, **settings) -> np.ndarray:
    """World points [M, 3] (dataset frame; M may be 0) triangulated from up to `max_views` of
    the scene's images `indices` (evenly spaced), each matched with its nearest neighbours
    (`settings`: those of triangulated_pairs)."""
    from fastnefes.data.normalize import evenly_spaced

    views = evenly_spaced(list(indices), max_views)
    if len(views) < 2:
        return np.zeros((0, 3))
    points = [pair.points for pair in triangulated_pairs(scene, views, **settings)]
    return np.concatenate(points) if points else np.zeros((0, 3))


def keypoint_depths(scene, indices: Sequence[int], center: Optional[np.ndarray] = None, max_views: int = 256,
                    min_angle_deg: float = 2.0, baseline_fraction: float = 0.05, agree: float = 0.02
                    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Sparse depth for training (DS-NeRF's free supervision): the keypoints of the scene's
    images `indices` (up to `max_views`, evenly spaced) whose depth two matches with different
    neighbours triangulate alike (within `agree`, relative). One pair's triangulation can be a
    wrong match along the epipolar line (repeated texture passes every two-view test); two
    independent ones that agree rarely are. Each view is matched with its two nearest cameras
    at least baseline_fraction of the cameras' median distance to `center` (the scene's centre,
    dataset frame) away: consecutive video frames are too close to triangulate.

    Returns:
        {view: (flat pixel indices [M] long, row-major at the loaded resolution; z-depth [M]
        float32, dataset units, the median of the agreeing triangulations)} for the views with
        such keypoints; a pixel holding several keeps the nearest.
    """
    from fastnefes.data.normalize import evenly_spaced

    views = evenly_spaced(list(indices), max_views)
    if len(views) < 2:
        return {}
    min_baseline = 0.0
    if center is not None:
        distance = np.linalg.norm(scene.c2w[views][:, :3, 3] - np.asarray(center, dtype=np.float64), axis=1)
        min_baseline = baseline_fraction * float(np.median(distance))
    estimates: dict[int, dict[int, list]] = {}  # view -> keypoint -> [(x, z), ...]
    for pair in triangulated_pairs(scene, views, min_angle_deg=min_angle_deg, min_baseline=min_baseline):
        for view, x, k in ((pair.i, pair.x_i, pair.k_i), (pair.j, pair.x_j, pair.k_j)):
            c2w = np.asarray(scene.c2w[view], dtype=np.float64)
            z = (pair.points - c2w[:3, 3]) @ c2w[:3, 2]
            per_view = estimates.setdefault(view, {})
            for xy, kk, zz in zip(x, k, z):
                per_view.setdefault(int(kk), []).append((xy, zz))
    out = {}
    for view, keypoints in estimates.items():
        h, w = (int(v) for v in scene.hw[view])
        flat, depth = [], []
        for seen in keypoints.values():
            z = np.array([zz for _, zz in seen])
            if len(z) < 2 or not (z > 0).all() or (z.max() - z.min()) > agree * z.min():
                continue
            col, row = (int(np.floor(c)) for c in seen[0][0])
            if 0 <= col < w and 0 <= row < h:
                flat.append(row * w + col)
                depth.append(float(np.median(z)))
        if not flat:
            continue
        flat_a, depth_a = np.array(flat, dtype=np.int64), np.array(depth, dtype=np.float32)
        order = np.lexsort((depth_a, flat_a))  # by pixel, nearest first
        flat_a, depth_a = flat_a[order], depth_a[order]
        first = np.ones(len(flat_a), bool)
        first[1:] = flat_a[1:] != flat_a[:-1]
        out[view] = (flat_a[first], depth_a[first])
    return out
