"""SO(3) / SE(3) exponential and logarithm maps and quaternions (torch, differentiable).

Every function accepts torch tensors (any leading batch shape) or numpy arrays; numpy in
gives numpy (float64) out. Quaternions are Hamilton, scalar first: (w, x, y, z).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def numpy_compatible(fn):
    """Let a torch function take and return numpy arrays (computed in float64)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if any(isinstance(a, np.ndarray) for a in args):
            targs = [torch.from_numpy(np.asarray(a, dtype=np.float64)) if isinstance(a, np.ndarray) else a for a in args]
            out = fn(*targs, **kwargs)
            if isinstance(out, tuple):
                return tuple(o.numpy() for o in out)
            return out.numpy()
        return fn(*args, **kwargs)

    return wrapper


def _skew(w: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrix."""
    zero = torch.zeros_like(w[..., 0])
    x, y, z = w.unbind(-1)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*w.shape[:-1], 3, 3)


def _taylor_coeffs(theta: torch.Tensor):
    """A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3, stable near 0."""
    small = theta < 1e-4
    t = torch.where(small, torch.ones_like(theta), theta)
    t2 = t * t
    a = torch.where(small, 1 - theta**2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta**2 / 24, (1 - torch.cos(t)) / t2)
    c = torch.where(small, 1.0 / 6 - theta**2 / 120, (t - torch.sin(t)) / (t2 * t))
    return a, b, c


@numpy_compatible
def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Axis-angle [..., 3] -> rotation matrix [..., 3, 3] (Rodrigues)."""
    theta = torch.sqrt((w * w).sum(-1).clamp_min(1e-30))
    a, b, _ = _taylor_coeffs(theta)
    k = _skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


@numpy_compatible
def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix [..., 3, 3] -> axis-angle [..., 3], robust at 0 and 180 degrees."""
    return quat_to_axis_angle(rotmat_to_quat(R))


@numpy_compatible
def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Twist [..., 6] = (rotation w, translation v) -> 4x4 transform [..., 4, 4]."""
    w, v = xi[..., :3], xi[..., 3:]
    theta = torch.sqrt((w * w).sum(-1).clamp_min(1e-30))
    a, b, c = _taylor_coeffs(theta)
    k = _skew(w)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(k.shape)
    R = eye + a[..., None, None] * k + b[..., None, None] * (k @ k)
    V = eye + b[..., None, None] * k + c[..., None, None] * (k @ k)
    t = (V @ v[..., None])[..., 0]
    out = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype, device=xi.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1
    return out


@numpy_compatible
def se3_log(T: torch.Tensor) -> torch.Tensor:
    """4x4 transform [..., 4, 4] -> twist [..., 6] = (rotation w, translation v)."""
    w = so3_log(T[..., :3, :3])
    theta = torch.sqrt((w * w).sum(-1).clamp_min(1e-30))
    a, b, _ = _taylor_coeffs(theta)
    k = _skew(w)
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand(k.shape)
    # V^-1 = I - K/2 + (1/t^2)(1 - A/(2B)) K^2, with the small-angle limit 1/12.
    small = theta < 1e-4
    safe_b = torch.where(small, torch.ones_like(b), b)
    safe_t2 = torch.where(small, torch.ones_like(theta), theta * theta)
    d = torch.where(small, 1.0 / 12 + theta**2 / 720, (1 - a / (2 * safe_b)) / safe_t2)
    V_inv = eye - 0.5 * k + d[..., None, None] * (k @ k)
    v = (V_inv @ T[..., :3, 3:4])[..., 0]
    return torch.cat([w, v], dim=-1)


@numpy_compatible
def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Quaternion [..., 4] (w, x, y, z; normalised here) -> rotation matrix [..., 3, 3]."""
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


@numpy_compatible
def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix [..., 3, 3] -> unit quaternion [..., 4] (w, x, y, z) with w >= 0.

    Shepperd's method: pick the largest of (trace, diagonal) to divide by, so the result is
    accurate near 180 degrees where w -> 0.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    tr = m00 + m11 + m22
    cands = torch.stack(
        [
            torch.stack([1 + tr, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),
            torch.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),
        ],
        dim=-2,
    )  # [..., 4, 4]; row i is 4 q_i q scaled
    diag = torch.stack([tr, m00, m11, m22], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternion [..., 4] -> axis-angle [..., 3] with angle in [0, pi]."""
    q = torch.where(q[..., :1] < 0, -q, q)
    xyz = q[..., 1:]
    s = torch.sqrt((xyz * xyz).sum(-1).clamp_min(1e-30))
    angle = 2 * torch.atan2(s, q[..., 0])
    # angle / s -> 2 as s -> 0
    scale = torch.where(s < 1e-8, 2.0 / q[..., 0].clamp_min(1e-12), angle / s)
    return xyz * scale[..., None]


@numpy_compatible
def orthonormalize(R: torch.Tensor) -> torch.Tensor:
    """Nearest rotation matrix [..., 3, 3] (SVD, det +1)."""
    U, _, Vh = torch.linalg.svd(R)
    d = torch.det(U @ Vh)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    return U @ D @ Vh
