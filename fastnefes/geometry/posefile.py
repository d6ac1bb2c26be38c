"""Pose files: one line per image, `NAME qw qx qy qz tx ty tz` (world-to-camera).

Lines starting with `#` and blank lines are ignored. Poses are returned and accepted as
camera-to-world 4x4 matrices in OpenCV axes, the internal convention.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.geometry.cameras import invert_pose
from fastnefes.geometry.lie import quat_to_rotmat, rotmat_to_quat
from fastnefes.io import read_text

QUAT_NORM_TOL = 1e-3


def parse_pose_line(fields: list[str], where: str, extra_fields: int = 0) -> tuple[str, np.ndarray]:
    """Parse `NAME qw qx qy qz tx ty tz [extra...]` into (name, c2w [4, 4])."""
    expected = 8 + extra_fields
    if len(fields) != expected:
        raise FastnefesError(f"{where}: expected {expected} fields (NAME qw qx qy qz tx ty tz{' ...' * bool(extra_fields)}), "
                             f"found {len(fields)}")
    try:
        values = [float(v) for v in fields[1:8]]
    except ValueError:
        raise FastnefesError(f"{where}: expected numbers after the image name, found {' '.join(fields[1:8])!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise FastnefesError(f"{where}: non-finite number in pose {' '.join(fields[1:8])!r}")
    q = np.array(values[:4])
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUAT_NORM_TOL:
        raise FastnefesError(f"{where}: quaternion norm {norm:.6f} is not 1 (tolerance {QUAT_NORM_TOL})")
    w2c = np.eye(4)
    w2c[:3, :3] = quat_to_rotmat(q)
    w2c[:3, 3] = values[4:7]
    return fields[0], invert_pose(w2c)


def read_poses(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a pose file -> {name: camera-to-world [4, 4]} in file order."""
    path = Path(path)
    if not path.is_file():
        raise FastnefesError(f"{path}: pose file not found")
    poses: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(read_text(path, "a pose file (NAME qw qx qy qz tx ty tz)").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        where = f"{path}:{lineno}"
        if len(fields) == 9:  # a confidence column (fastnefes refine writes one)
            confidence = _number(fields[8], where, "confidence")
            if not 0.0 <= confidence <= 1.0:
                raise FastnefesError(f"{where}: confidence {fields[8]} is not in [0, 1]")
            fields = fields[:8]
        name, c2w = parse_pose_line(fields, where)
        if name in poses:
            raise FastnefesError(f"{path}:{lineno}: duplicate image name {name!r}")
        poses[name] = c2w
    return poses


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FastnefesError(f"{where}: expected a number ({what}), found {text!r}") from None
    if not math.isfinite(value):
        raise FastnefesError(f"{where}: non-finite {what} {text!r}")
    return value


def format_poses(poses: dict[str, np.ndarray], confidence: dict[str, float] | None = None) -> str:
    """Pose-file text for {name: camera-to-world [4, 4]}; with `confidence` ({name: [0, 1]}),
    a ninth column (as ACE-style localisers write)."""
    header = "# NAME qw qx qy qz tx ty tz" + (" confidence" if confidence is not None else "")
    lines = [header + " (world-to-camera, OpenCV camera axes)"]
    for name, c2w in poses.items():
        c2w = np.asarray(c2w, dtype=np.float64)
        if not np.all(np.isfinite(c2w)):
            raise ValueError(f"pose for {name!r} is not finite")
        q = rotmat_to_quat(invert_pose(c2w)[:3, :3])
        # t from the quaternion actually written, so the camera centre -R^T t survives exactly
        # even when the input rotation is orthonormal only to float32 precision.
        t = -quat_to_rotmat(q) @ c2w[:3, 3]
        extra = f" {float(confidence[name]):.4f}" if confidence is not None else ""
        lines.append(f"{name} " + " ".join(f"{v:.10f}" for v in (*q, *t)) + extra)
    return "\n".join(lines) + "\n"


def write_poses(path: str | os.PathLike, poses: dict[str, np.ndarray], confidence: dict[str, float] | None = None) -> None:
    """Write {name: camera-to-world [4, 4]} (and an optional confidence column) atomically."""
    from fastnefes.io import write_text

    write_text(path, format_poses(poses, confidence))
