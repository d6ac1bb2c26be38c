"""Pose errors and seeded random perturbations (design.md conventions)."""

from __future__ import annotations

import numpy as np

from fastnefes.geometry.lie import orthonormalize, rotmat_to_quat, so3_exp


def pose_errors(c2w_est: np.ndarray, c2w_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation error (distance between camera centres) and rotation error in degrees.

    Args:
        c2w_est, c2w_gt: [..., 4, 4] (or [..., 3, 4]) camera-to-world poses.
    Returns:
        (trans_err [...], rot_err_deg [...]). The rotation error is the angle of R_est^T R_gt,
        computed from quaternions after SVD-orthonormalising both, so slightly non-orthonormal
        inputs do not inflate it.
    """
    est = np.asarray(c2w_est, dtype=np.float64)
    gt = np.asarray(c2w_gt, dtype=np.float64)
    trans = np.linalg.norm(est[..., :3, 3] - gt[..., :3, 3], axis=-1)
    q_est = rotmat_to_quat(orthonormalize(est[..., :3, :3]))
    q_gt = rotmat_to_quat(orthonormalize(gt[..., :3, :3]))
    dot = np.clip(np.abs((q_est * q_gt).sum(-1)), 0.0, 1.0)
    rot = np.degrees(2.0 * np.arccos(dot))
    return trans, rot


def _magnitudes(spec, n: int, rng: np.random.Generator) -> np.ndarray:
    """A float gives n equal magnitudes; a (lo, hi) pair gives uniform draws in [lo, hi]."""
    if isinstance(spec, (tuple, list)):
        lo, hi = float(spec[0]), float(spec[1])
        return rng.uniform(lo, hi, size=n)
    return np.full(n, float(spec))


def random_unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    """n directions uniform on the sphere [n, 3]."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def perturb_poses(c2w: np.ndarray, rot_deg, trans, seed: int = 0) -> np.ndarray:
    """Perturb camera-to-world poses [N, 4, 4] by exact (or uniformly drawn) magnitudes.

    Each camera is rotated about its own centre by `rot_deg` degrees around a uniformly random
    axis, and its centre moved by `trans` (dataset units) in a uniformly random direction, so
    `pose_errors(perturbed, c2w)` returns exactly (trans, rot_deg). `rot_deg` and `trans` are
    floats or (lo, hi) ranges.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    n = c2w.shape[0]
    rng = np.random.default_rng(seed)
    angles = np.radians(_magnitudes(rot_deg, n, rng))
    dists = _magnitudes(trans, n, rng)
    axes = random_unit_vectors(n, rng)
    dirs = random_unit_vectors(n, rng)
    out = c2w.copy()
    out[:, :3, :3] = c2w[:, :3, :3] @ so3_exp(axes * angles[:, None])
    out[:, :3, 3] = c2w[:, :3, 3] + dirs * dists[:, None]
    return out
