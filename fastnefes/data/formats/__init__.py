"""Scene formats: one module per on-disk format, each with `load_<fmt>` and `write_<fmt>`.

This package module holds the pieces every format shares: image sizes read from file headers,
the loaded resolution (`downscale`, `max_side`) and its exact intrinsics, lazy image / depth
sources (picklable, so data-loader workers can use them), undistortion, split helpers and a
staged output folder that is renamed into place only when a writer has finished.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.io import read_image

ROTATION_TOL = 1e-3  # max |R^T R - I| entry accepted as a rotation (files store ~7 digits)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


# ----------------------------------------------------------------------------- sizes


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its PNG / JPEG header (full decode for others)."""
    path = Path(path)
    if not path.is_file():
        raise FastnefesError(f"{path}: image file not found")
    with open(path, "rb") as f:
        head = f.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return int(h), int(w)
        if head[:2] == b"\xff\xd8":
            hw = _jpeg_size(f)
            if hw is not None:
                return hw
    img = read_image(path, unchanged=True)
    return int(img.shape[0]), int(img.shape[1])


def _jpeg_size(f) -> Optional[tuple[int, int]]:
    """Walk JPEG markers to the first start-of-frame; None if the header is malformed."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        size = f.read(2)
        if len(size) < 2:
            return None
        (length,) = struct.unpack(">H", size)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return int(h), int(w)
        f.seek(length - 2, os.SEEK_CUR)


def loaded_size(hw: tuple[int, int], downscale: float = 1, max_side: Optional[int] = None) -> tuple[int, int]:
    """(height, width) an image of size `hw` is loaded at: divided by `downscale`, then
    shrunk further so that its longer side is at most `max_side`."""
    h, w = int(hw[0]), int(hw[1])
    factor = float(downscale)
    if max_side is not None and max(h, w) / factor > max_side:
        factor = max(h, w) / float(max_side)
    return max(1, int(round(h / factor))), max(1, int(round(w / factor)))


def check_resolution_options(downscale: float, max_side: Optional[int]) -> None:
    if not (isinstance(downscale, (int, float)) and math.isfinite(downscale) and downscale >= 1):
        raise FastnefesError(f"downscale must be a number >= 1, got {downscale!r}")
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise FastnefesError(f"max_side must be a positive integer, got {max_side!r}")


def resize_intrinsics(K: np.ndarray, hw_from, hw_to) -> np.ndarray:
    """Intrinsics [..., 3, 3] for an image resized from hw_from to hw_to (cv2.resize geometry:
    image coordinates scale by W'/W and H'/H, exact with the pixel-centre-at-0.5 convention)."""
    sy = hw_to[0] / hw_from[0]
    sx = hw_to[1] / hw_from[1]
    return np.diag([sx, sy, 1.0]) @ np.asarray(K, dtype=np.float64)


# ----------------------------------------------------------------------------- lazy sources


def undistort(image: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Undistort to the pinhole camera K (same size). K uses the pixel-centre-at-0.5 convention
    (COLMAP, fastnefes); OpenCV puts pixel centres at integers, hence the half-pixel shift."""
    import cv2

    K_cv = np.asarray(K, dtype=np.float64).copy()
    K_cv[0, 2] -= 0.5
    K_cv[1, 2] -= 0.5
    return cv2.undistort(image, K_cv, np.asarray(dist, dtype=np.float64), newCameraMatrix=K_cv)


def to_rgb8(image: np.ndarray, path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB from a decoded image (grey, grey+alpha, RGB, RGBA; 8 or 16 bit).
    Alpha is composited on a white background."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise FastnefesError(f"{path}: unsupported pixel type {image.dtype} (expected 8 or 16 bit)")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    channels = image.shape[2]
    if channels in (2, 4):
        alpha = image[..., -1:].astype(np.float32) / 255.0
        color = image[..., :-1].astype(np.float32)
        if channels == 2:
            color = np.repeat(color, 3, axis=2)
        image = (color * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
        return np.ascontiguousarray(image)
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    return image


@dataclass
class LazyImages:
    """image_fn for a Scene: reads image i, checks its stored size, undistorts, resizes.

    paths: [N] files; stored_hw: [N, 2] sizes on disk; loaded_hw: [N, 2] sizes to return;
    K_stored / dist: optional per-image pinhole [N, 3, 3] and OpenCV distortion [N, k] at the
    stored size (rows of zeros mean no distortion).
    """

    paths: list[Path]
    stored_hw: np.ndarray
    loaded_hw: np.ndarray
    K_stored: Optional[np.ndarray] = None
    dist: Optional[np.ndarray] = None

    def __call__(self, i: int) -> np.ndarray:
        import cv2

        path = self.paths[i]
        image = to_rgb8(read_image(path, unchanged=True), path)
        h, w = int(self.stored_hw[i][0]), int(self.stored_hw[i][1])
        if image.shape[:2] != (h, w):
            raise FastnefesError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected {w}x{h}")
        if self.dist is not None and np.any(self.dist[i] != 0):
            image = undistort(image, self.K_stored[i], self.dist[i])
        lh, lw = int(self.loaded_hw[i][0]), int(self.loaded_hw[i][1])
        if (lh, lw) != (h, w):
            image = cv2.resize(image, (lw, lh), interpolation=cv2.INTER_AREA)
        return image


@dataclass
class LazyDepths:
    """depth_fn for a Scene: 16-bit depth PNG * unit_scale, `invalid` raw values -> 0, resized
    (nearest neighbour, so no depth is invented across edges) to the loaded image size.
    A path of None gives an all-invalid map."""

    paths: list[Optional[Path]]
    loaded_hw: np.ndarray
    unit_scale: float = 1e-3
    invalid: Optional[int] = 65535

    def __call__(self, i: int) -> np.ndarray:
        import cv2

        lh, lw = int(self.loaded_hw[i][0]), int(self.loaded_hw[i][1])
        path = self.paths[i]
        if path is None:
            return np.zeros((lh, lw), np.float32)
        raw = read_image(path, unchanged=True)
        if raw.ndim != 2 or raw.dtype not in (np.uint16, np.uint8):
            raise FastnefesError(f"{path}: depth must be a single-channel 16-bit PNG, got {raw.dtype} {raw.shape}")
        depth = raw.astype(np.float32) * np.float32(self.unit_scale)
        if self.invalid is not None:
            depth[raw == self.invalid] = 0.0
        if depth.shape != (lh, lw):
            depth = cv2.resize(depth, (lw, lh), interpolation=cv2.INTER_NEAREST)
        return depth


def depth_to_mm(depth: np.ndarray, invalid: int) -> np.ndarray:
    """float depth (dataset units, metres) -> uint16 millimetres; 0 / out of range -> `invalid`."""
    mm = np.round(np.nan_to_num(depth, nan=0.0, posinf=0.0) * 1000.0)
    bad = (mm <= 0) | (mm >= 65535)
    return np.where(bad, invalid, mm).astype(np.uint16)


def fetch_image(scene, i: int) -> np.ndarray:
    """Image i of a scene without filling its cache (writers stream through all images)."""
    if i in scene._cache:
        return scene._cache[i]
    image = scene.image_fn(i)
    h, w = int(scene.hw[i][0]), int(scene.hw[i][1])
    if image.shape[:2] != (h, w) or image.dtype != np.uint8:
        raise FastnefesError(f"{scene.names[i]}: image_fn returned {image.dtype} {image.shape}, expected uint8 {h}x{w}x3")
    return image


# ----------------------------------------------------------------------------- checks and text


def check_rotation(R: np.ndarray, where: str) -> None:
    """Raise naming `where` unless R [3, 3] is a rotation (orthonormal within ROTATION_TOL, det +1)."""
    if not np.all(np.isfinite(R)):
        raise FastnefesError(f"{where}: non-finite value in the rotation")
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > ROTATION_TOL or np.linalg.det(R) < 0:
        raise FastnefesError(
            f"{where}: not a rotation matrix (|R^T R - I| = {err:.2e}, det {np.linalg.det(R):+.3f}; "
            f"expected orthonormal within {ROTATION_TOL:g}, det +1)"
        )


def parse_floats(fields: Sequence[str], where: str, what: str) -> np.ndarray:
    """Finite float64 values of `fields`, or an error naming `where` and `what` was expected."""
    try:
        values = np.array([float(v) for v in fields], dtype=np.float64)
    except ValueError:
        raise FastnefesError(f"{where}: expected numbers ({what}), found {' '.join(fields)!r}") from None
    if not np.all(np.isfinite(values)):
        raise FastnefesError(f"{where}: non-finite number in {' '.join(fields)!r} ({what})")
    return values


def fmt(v: float) -> str:
    """Shortest text that reads back as exactly the same float64."""
    return repr(float(v))


def posix_name(path: Path, root: Path) -> str:
    """Path relative to root, POSIX separators, no leading './'."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FastnefesError(f"{path}: folder not found (expected {what})")
    return path


# ----------------------------------------------------------------------------- splits


def make_splits(train: Sequence[int], val: Sequence[int], test: Sequence[int]) -> dict[str, list[int]]:
    """Scene splits: a missing val falls back to test and vice versa."""
    val = list(val) if len(val) else list(test)
    test = list(test) if len(test) else list(val)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def every_nth_splits(n: int, every: int = 8) -> dict[str, list[int]]:
    """Index % every == 0 is test (and val), the rest train (design.md)."""
    test = [i for i in range(n) if i % every == 0]
    train = [i for i in range(n) if i % every != 0]
    return make_splits(train, test, test)


def train_and_heldout(scene) -> tuple[list[int], list[int]]:
    """Writers' view of splits: (train indices, held-out indices = everything else).
    Formats with two lists store the held-out images as their test split; images that are in
    no split are written as train."""
    heldout = set(scene.splits.get("test", [])) | set(scene.splits.get("val", []))
    heldout -= set(scene.splits.get("train", []))
    train = [i for i in range(len(scene)) if i not in heldout]
    return train, sorted(heldout)


def sequence_names(scene, name_of, sequence_length: int) -> list[str]:
    """Names for sequence-based formats: train images fill sequences 1, 2, ... in chunks of
    `sequence_length`, then held-out images fill the following sequences.
    name_of(seq_number, frame_number) -> name. Returns names in scene index order."""
    train, heldout = train_and_heldout(scene)
    names: list[Optional[str]] = [None] * len(scene)
    seq = 0
    for group in (train, heldout):
        for start in range(0, len(group), sequence_length):
            seq += 1
            for frame, i in enumerate(group[start : start + sequence_length]):
                names[i] = name_of(seq, frame)
    return names  # type: ignore[return-value]


# ----------------------------------------------------------------------------- output


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir; on success it becomes out_dir.

    An existing non-empty out_dir is an error unless `overwrite` (then it is replaced only after
    the new one is complete).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastnefesError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FastnefesError(f"{out_dir}: folder exists and is not empty (choose another output or overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def find_image_file(base: Path) -> Optional[Path]:
    """`base` if it is a file, else base + the first of IMAGE_SUFFIXES that exists."""
    if base.is_file():
        return base
    for suffix in IMAGE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def export_points(scene, max_points: int = 20000, max_images: int = 32):
    """Sparse points for formats that store them (COLMAP points3D, NVM): the scene's own points
    (grey, no observation), else points back-projected from up to `max_images` depth maps.

    Returns xyz [M, 3] float64, rgb [M, 3] uint8, image index [M] (-1: none) and pixel [M, 2];
    None when the scene has neither points nor depth.
    """
    from fastnefes.data.normalize import backproject_depth, evenly_spaced

    if scene.points is not None:
        xyz = np.asarray(scene.points, dtype=np.float64).reshape(-1, 3)
        m = len(xyz)
        return xyz, np.full((m, 3), 128, np.uint8), np.full(m, -1), np.zeros((m, 2))
    if scene.depth_fn is None:
        return None
    chosen = evenly_spaced(range(len(scene)), max_images)
    per_image = max(1, max_points // max(1, len(chosen)))
    parts = []
    for i in chosen:
        depth = scene.depth(i)
        stride = max(1, int(np.ceil(np.sqrt(depth.size / per_image))))
        xyz, pix = backproject_depth(depth, scene.K[i], scene.c2w[i], stride)
        image = fetch_image(scene, i)
        rgb = image[pix[:, 1].astype(int), pix[:, 0].astype(int)]
        parts.append((xyz, rgb, np.full(len(xyz), i), pix))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))
