"""Camera conventions, intrinsics and ray generation.

Internally every camera uses OpenCV axes (x right, y down, z forward) and camera-to-world
4x4 poses. A pixel (row i, column j) has its centre at image coordinates (j + 0.5, i + 0.5),
so an image of width W with a centred principal point has cx = W / 2, and downscaling by s
divides fx, fy, cx, cy by s exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from fastnefes.geometry.lie import numpy_compatible

# Flips the camera's y and z axes: OpenGL (x right, y up, z backward) <-> OpenCV.
_GL_CV_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


@numpy_compatible
def opengl_to_opencv(c2w: torch.Tensor) -> torch.Tensor:
    """Camera-to-world [..., 4, 4] (or [..., 3, 4]) in OpenGL axes -> OpenCV axes. Self-inverse."""
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
    out = c2w.clone()
    out[..., :3, :3] = c2w[..., :3, :3] * flip
    return out


opencv_to_opengl = opengl_to_opencv


@numpy_compatible
def invert_pose(T: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid transform [..., 4, 4] (camera-to-world <-> world-to-camera)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:4]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:4] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def make_intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole matrix [3, 3] (float64)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def scale_intrinsics(K, factor: float):
    """Intrinsics for an image resized by `factor` (0.5 halves width and height). [..., 3, 3]."""
    S = np.diag([factor, factor, 1.0])
    if isinstance(K, torch.Tensor):
        return torch.as_tensor(S, dtype=K.dtype, device=K.device) @ K
    return S @ np.asarray(K, dtype=np.float64)


def pixel_grid(height: int, width: int, stride: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Image coordinates [h, w, 2] (x, y) of the pixel centres of a `stride`-subsampled grid.

    With stride s the grid has h = height // s rows; sample (i, j) is the centre of the s x s
    block, i.e. ((j + 0.5) * s, (i + 0.5) * s): the same rays a camera with intrinsics scaled
    by 1/s sees, so a feature map at 1/s resolution aligns with its image.
    """
    h, w = height // stride, width // stride
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def camera_directions(K: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Camera-frame ray directions with z = 1 for pixel coordinates [..., 2]; K [3, 3] or [..., 3, 3]."""
    fx, fy = K[..., 0, 0], K[..., 1, 1]
    cx, cy = K[..., 0, 2], K[..., 1, 2]
    x = (pixels[..., 0] - cx) / fx
    y = (pixels[..., 1] - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def generate_rays(K: torch.Tensor, c2w: torch.Tensor, pixels: torch.Tensor):
    """World rays through pixels.

    Args:
        K: [3, 3] or [B, 3, 3] intrinsics at the pixels' resolution.
        c2w: [4, 4] / [3, 4] or [B, 4, 4] / [B, 3, 4] OpenCV camera-to-world poses.
        pixels: [..., 2] image coordinates; with batched poses, [B, ..., 2].
    Returns:
        origins [..., 3], unit directions [..., 3], and z_per_t [...] (the camera-z component of
        the unit direction: z-depth = t * z_per_t).
    """
    extra = pixels.dim() - 1 - (c2w.dim() - 2)  # pixel dims beyond the batch dims
    if K.dim() > 2:
        K = K.reshape(*K.shape[:-2], *([1] * extra), 3, 3)
    d_cam = camera_directions(K, pixels)
    d_cam = d_cam / torch.linalg.norm(d_cam, dim=-1, keepdim=True)
    R = c2w[..., :3, :3].reshape(*c2w.shape[:-2], *([1] * extra), 3, 3)
    t = c2w[..., :3, 3].reshape(*c2w.shape[:-2], *([1] * extra), 3)
    dirs = (R @ d_cam[..., None])[..., 0]
    origins = t.expand_as(dirs)
    return origins, dirs, d_cam[..., 2]


def world_to_camera(points: Tensor, c2w: Tensor) -> Tensor:
    """World points [B, N, 3] in the camera frames of c2w [B, 4, 4] -> [B, N, 3] (z: depth)."""
    return (points - c2w[:, None, :3, 3]) @ c2w[:, :3, :3]


def backproject(pixels: Tensor, depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """World points [B,h,w,3] of image coordinates pixels [B,h,w,2] at z-depth [B,h,w]; K [B,3,3], c2w [B,4,4]."""
    Kb = K[:, None, None]
    x = (pixels[..., 0] - Kb[..., 0, 2]) / Kb[..., 0, 0] * depth
    y = (pixels[..., 1] - Kb[..., 1, 2]) / Kb[..., 1, 1] * depth
    cam = torch.stack([x, y, depth], -1)
    return cam @ c2w[:, None, :3, :3].transpose(-1, -2) + c2w[:, None, None, :3, 3]
