"""The hash grid's finest resolution from the cameras: cells about one pixel's footprint.

A multiresolution grid resolves nothing finer than its finest level's cells. Sized for a
160x120 render, a grid is several times too coarse for a 640x480 photograph of the same room;
instant-ngp sizes its finest level from the scene's extent for the same reason. Here the finest
level is matched to what the training images can resolve: one pixel's footprint at the typical
camera-to-content distance.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

MAX_PER_LEVEL_SCALE = 2.0  # instant-ngp's largest growth factor between levels


def pixel_footprint_cells(K: np.ndarray, c2w: np.ndarray, center: np.ndarray, scale: float,
                          indices: Optional[Sequence[int]] = None) -> float:
    """Cells across the unit cube at which one cell is one pixel's footprint.

    Args:
        K: [N, 3, 3] intrinsics at the loaded resolution; c2w: [N, 4, 4] camera-to-world.
        center, scale: the scene normalisation (x_unit = (x - center) * scale + 0.5).
        indices: the cameras that count (default all).
    Returns:
        median over cameras of focal / (distance to the centre * scale): a pixel's footprint at
        the scene centre is distance / focal world units, i.e. distance * scale / focal of the cube.
    """
    idx = list(range(len(K))) if indices is None else list(indices)
    K, c2w = np.asarray(K, dtype=np.float64)[idx], np.asarray(c2w, dtype=np.float64)[idx]
    focal = 0.5 * (K[:, 0, 0] + K[:, 1, 1])
    distance = np.linalg.norm(c2w[:, :3, 3] - np.asarray(center, dtype=np.float64), axis=1)
    ok = (distance > 0) & np.isfinite(distance) & (focal > 0)
    if not ok.any():
        return 0.0
    return float(np.median(focal[ok] / (distance[ok] * scale)))


def per_level_scale_for(finest: float, base_resolution: int, n_levels: int, floor: float,
                        ceiling: float = MAX_PER_LEVEL_SCALE) -> float:
    """The per-level growth b with base * b^(L-1) = finest, clamped to [floor, ceiling]."""
    if n_levels < 2 or not finest > base_resolution:
        return floor
    b = math.exp(math.log(finest / base_resolution) / (n_levels - 1))
    return float(min(max(b, floor), max(ceiling, floor)))
