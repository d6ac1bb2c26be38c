"""The Scene: posed images of one place, in the dataset's own frame and units."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastnefes.errors import FastnefesError

SPLITS = ("train", "val", "test")


@dataclass
class Scene:
    """Posed images, loaded lazily.

    Attributes:
        root: dataset root folder.
        names: [N] image names relative to root (POSIX, with extension) — the pose-file NAMEs.
        c2w: [N, 4, 4] float64 camera-to-world poses, OpenCV camera axes, dataset frame/units.
        K: [N, 3, 3] float64 intrinsics at the loaded (possibly downscaled) resolution.
        hw: [N, 2] int (height, width) of each loaded image.
        splits: {"train", "val", "test"} -> image indices. "val" is the dataset's validation
            split if it has one, else its test split (and vice versa).
        image_fn: i -> uint8 [H, W, 3] RGB at the loaded resolution.
        depth_fn: i -> float32 [H, W] z-depth in dataset units (0 = invalid), or None.
        points: optional [M, 3] float64 sparse 3D points (e.g. from COLMAP) in the dataset frame.
        format: the format name the scene was loaded from.
        load_options: how it was loaded (fastnefes.data.options record), for reports.
    """

    root: Path
    names: list[str]
    c2w: np.ndarray
    K: np.ndarray
    hw: np.ndarray
    splits: dict[str, list[int]]
    image_fn: Callable[[int], np.ndarray]
    depth_fn: Optional[Callable[[int], np.ndarray]] = None
    points: Optional[np.ndarray] = None
    format: str = ""
    load_options: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def image(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB of image i (cached after the first load)."""
        if i not in self._cache:
            img = self.image_fn(i)
            h, w = int(self.hw[i][0]), int(self.hw[i][1])
            if img.shape[:2] != (h, w):
                raise FastnefesError(
                    f"{self.root / self.names[i]}: image is {img.shape[1]}x{img.shape[0]}, intrinsics expect {w}x{h}"
                )
            self._cache[i] = img
        return self._cache[i]

    def depth(self, i: int) -> Optional[np.ndarray]:
        """float32 [H, W] z-depth of image i in dataset units (0 invalid), or None."""
        return None if self.depth_fn is None else self.depth_fn(i)

    def split(self, name: str) -> list[int]:
        """Indices of a split ("train", "val" or "test")."""
        if name not in SPLITS:
            raise FastnefesError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return list(self.splits.get(name, []))

    def index_of(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}
