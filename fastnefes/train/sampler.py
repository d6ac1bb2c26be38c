"""Training batches from a Scene: random rays, rays from a few whole images, jittered patches.

All images of the split live on the training device as one flat uint8 pixel array (images may
differ in size); every draw uses the sampler's own torch.Generator, whose state is saved with
checkpoints so a resumed run draws the same batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.field.act import luma_histogram
from fastnefes.geometry import backproject, generate_rays, so3_exp


class RayBatch(NamedTuple):
    origins: Tensor  # [R,3] dataset frame
    dirs: Tensor  # [R,3] unit
    rgb: Tensor  # [R,3] float in [0,1]
    image_ids: Tensor  # [R] long, index into the ImageSet
    pixels: Tensor  # [R,2] image coordinates (x, y) of the pixel centres
    depth: Optional[Tensor] = None  # [R] ground-truth ray distance (dataset units, 0 = invalid), if loaded


def require_depth(scene: Scene) -> None:
    """FastnefesError unless the scene has depth maps (for depth supervision)."""
    if scene.depth_fn is None:
        kind = f"this {scene.format} dataset" if scene.format else "this dataset"
        raise FastnefesError(f"{scene.root}: depth_weight > 0 needs depth maps, and {kind} has none")


class ImageSet:
    """The images of one split on a device: pixels, intrinsics, poses, luma histograms, and with
    `with_depth` the scene's depth maps (FastnefesError if it has none)."""

    def __init__(self, scene: Scene, indices: Sequence[int], device: torch.device | str, bins: int = 10,
                 with_depth: bool = False) -> None:
        if len(indices) == 0:
            raise FastnefesError(f"{scene.root}: no training images (the train split is empty)")
        self.indices = list(indices)
        images = [scene.image(i) for i in self.indices]
        self.hw = torch.tensor([img.shape[:2] for img in images], dtype=torch.long, device=device)
        sizes = self.hw[:, 0] * self.hw[:, 1]
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.pixels = torch.cat([torch.from_numpy(img).reshape(-1, 3) for img in images]).to(device)
        self.K = torch.as_tensor(scene.K[self.indices], dtype=torch.float32, device=device)
        self.c2w = torch.as_tensor(scene.c2w[self.indices], dtype=torch.float32, device=device)
        self.histograms = torch.stack([luma_histogram(img, bins) for img in images]).to(device)
        self.same_size = bool((self.hw == self.hw[0]).all())
        self.depths: Optional[Tensor] = None  # flat float32 z-depth, aligned with pixels
        if with_depth:
            require_depth(scene)
            depths = [np.asarray(scene.depth(i), dtype=np.float32) for i in self.indices]
            for i, img, depth in zip(self.indices, images, depths):
                if depth.shape != img.shape[:2]:
                    raise FastnefesError(f"{scene.root / scene.names[i]}: depth map is {depth.shape}, image is {img.shape[:2]}")
            self.depths = torch.cat([torch.from_numpy(d).reshape(-1) for d in depths]).to(device)
        # Sparse depth at keypoints (set_keypoints): image index [K], flat pixel [K], z-depth [K].
        self.keypoints: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def set_keypoints(self, found: dict[int, tuple[np.ndarray, np.ndarray]]) -> int:
        """Keep the sparse z-depths of fastnefes.data.triangulate.keypoint_depths ({scene view:
        (flat pixels [M], z [M])}) of this set's images; returns how many there are."""
        device = self.pixels.device
        where = {view: k for k, view in enumerate(self.indices)}
        parts = [(k, found[view]) for view, k in where.items() if view in found and len(found[view][0])]
        if not parts:
            self.keypoints = None
            return 0
        ids = torch.cat([torch.full((len(flat),), k, dtype=torch.long) for k, (flat, _) in parts])
        flat = torch.cat([torch.from_numpy(np.asarray(flat, dtype=np.int64)) for _, (flat, _) in parts])
        z = torch.cat([torch.from_numpy(np.asarray(z, dtype=np.float32)) for _, (_, z) in parts])
        self.keypoints = (ids.to(device), flat.to(device), z.to(device))
        return int(ids.shape[0])

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, k: int) -> Tensor:
        """uint8 [H,W,3] of image k."""
        h, w = (int(v) for v in self.hw[k])
        start = int(self.offsets[k])
        return self.pixels[start:start + h * w].view(h, w, 3)

    def border_colour(self) -> Tensor:
        """Median RGB [3] in [0,1] of the one-pixel image borders of all images."""
        borders = []
        for k in range(len(self)):
            img = self.image(k)
            borders += [img[0], img[-1], img[:, 0], img[:, -1]]
        return torch.cat(borders).float().median(dim=0).values / 255.0

    def stack(self, ks: Tensor) -> Tensor:
        """uint8 [B,H,W,3] of images ks (all of one size)."""
        return torch.stack([self.image(int(k)) for k in ks])


class RaySampler:
    """Draws training rays and patches from an ImageSet with its own generator."""

    def __init__(self, images: ImageSet, seed: int) -> None:
        self.images = images
        device = images.pixels.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.images.pixels.device)

    def choose_images(self, n: int) -> Tensor:
        """n distinct random image indices [n] (all of them if fewer), all of one size."""
        device = self.images.pixels.device
        order = torch.randperm(len(self.images), generator=self.generator, device=device)
        if not self.images.same_size:
            # Whole-image batches need one size: keep the images shaped like the first drawn.
            hw = self.images.hw
            order = order[(hw[order] == hw[order[0]]).all(-1)]
        return order[:n]

    def rays(self, n_rays: int, image_ids: Optional[Tensor] = None, keypoint_fraction: float = 0.0) -> RayBatch:
        """n_rays random pixels, from all images or evenly from image_ids [B] (then ordered
        image by image, n_rays // B each). Without image_ids and with keypoints set, the last
        round(n_rays * keypoint_fraction) rays (at most one per 8 keypoints) are random
        keypoints (their depth > 0, the others' 0 unless depth maps are loaded)."""
        imgs = self.images
        n_keypoints = 0
        if image_ids is None and imgs.keypoints is not None and keypoint_fraction > 0:
            # at most one ray per 8 keypoints: a handful of them must not be drawn over and over
            n_keypoints = min(int(round(n_rays * keypoint_fraction)), n_rays - 1, imgs.keypoints[0].shape[0] // 8)
        if image_ids is None:
            n_random = n_rays - n_keypoints
            ids = (self._rand(n_random) * len(imgs)).long().clamp_max(len(imgs) - 1)
        else:
            ids = image_ids.repeat_interleave(n_rays // image_ids.shape[0])
        hw = imgs.hw[ids]
        flat = (self._rand(ids.shape[0]) * (hw[:, 0] * hw[:, 1])).long()
        flat = torch.minimum(flat, hw[:, 0] * hw[:, 1] - 1)
        z = imgs.depths[imgs.offsets[ids] + flat] if imgs.depths is not None else None
        if n_keypoints:
            kp_ids, kp_flat, kp_z = imgs.keypoints
            pick = (self._rand(n_keypoints) * kp_ids.shape[0]).long().clamp_max(kp_ids.shape[0] - 1)
            z = torch.cat([torch.zeros_like(flat, dtype=torch.float32) if z is None else z, kp_z[pick]])
            ids, flat = torch.cat([ids, kp_ids[pick]]), torch.cat([flat, kp_flat[pick]])
            hw = imgs.hw[ids]
        row, col = flat // hw[:, 1], flat % hw[:, 1]
        rgb = imgs.pixels[imgs.offsets[ids] + flat].float() / 255.0
        pixels = torch.stack([col, row], -1).float() + 0.5
        origins, dirs, z_per_t = generate_rays(imgs.K[ids], imgs.c2w[ids], pixels)
        depth = None if z is None else z / z_per_t.clamp_min(1e-6)  # z-depth -> distance along the unit ray
        return RayBatch(origins, dirs, rgb, ids, pixels, depth)

    def patches(self, image_ids: Tensor, per_image: int, size: int, stride: int) -> Tensor:
        """Image coordinates [B*per_image, size, size, 2] of square patches of feature cells
        (size capped by the smallest image's cell count):
        cell (i, j) of a patch at top-left cell (i0, j0) is the point ((j0 + j + 0.5) s, (i0 + i + 0.5) s)."""
        hw = self.images.hw[image_ids].repeat_interleave(per_image, 0)  # [P,2]
        cells = torch.div(hw, stride, rounding_mode="floor")
        size = min(size, int(cells.min()))  # small images: the patch is the whole image
        top_left = (self._rand(hw.shape[0], 2) * (cells - size + 1)).long()  # (row, col)
        offs = torch.arange(size, device=hw.device)
        rows = (top_left[:, 0, None] + offs).float() + 0.5  # [P,size]
        cols = (top_left[:, 1, None] + offs).float() + 0.5
        grid_y = rows[:, :, None].expand(-1, size, size)
        grid_x = cols[:, None, :].expand(-1, size, size)
        return torch.stack([grid_x, grid_y], -1) * stride

    def jitter(self, c2w: Tensor, max_rot_deg: float, max_trans: float) -> Tensor:
        """Poses [B,4,4] rotated about their centres by U(0, max_rot_deg) degrees about random
        axes and moved by U(0, max_trans) (dataset units) in random directions."""
        B = c2w.shape[0]
        axes = torch.nn.functional.normalize(self._rand(B, 3) - 0.5, dim=-1)
        dirs = torch.nn.functional.normalize(self._rand(B, 3) - 0.5, dim=-1)
        angles = self._rand(B, 1) * math.radians(max_rot_deg)
        dists = self._rand(B, 1) * max_trans
        out = c2w.clone()
        out[:, :3, :3] = c2w[:, :3, :3] @ so3_exp(axes * angles)
        out[:, :3, 3] = c2w[:, :3, 3] + dirs * dists
        return out


def reproject(pixels: Tensor, depth: Tensor, K: Tensor, c2w_from: Tensor, c2w_to: Tensor) -> tuple[Tensor, Tensor]:
    """Where pixels [B,h,w,2] seen at z-depth [B,h,w] from c2w_from [B,4,4] land in c2w_to [B,4,4].

    K [B,3,3] is shared by both cameras. Returns image coordinates [B,h,w,2] and camera z [B,h,w] in c2w_to.
    """
    world = backproject(pixels, depth, K, c2w_from)
    cam = (world - c2w_to[:, None, None, :3, 3]) @ c2w_to[:, None, :3, :3]
    z = cam[..., 2]
    zs = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
    Kb = K[:, None, None]
    u = cam[..., 0] / zs * Kb[..., 0, 0] + Kb[..., 0, 2]
    v = cam[..., 1] / zs * Kb[..., 1, 1] + Kb[..., 1, 2]
    return torch.stack([u, v], -1), z
