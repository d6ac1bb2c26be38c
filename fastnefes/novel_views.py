"""Novel views rendered from a trained feature field, to train an APR on more than the training
images (as LENS and DFNet do)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastnefes.data.scene import Scene


def novel_view_renderer(run_dir: str | Path, scene: Scene, device: str = "cpu", max_side: int = 96
                        ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A function c2w [n, 4, 4] -> (images uint8 [n, h, w, 3], c2w [n, 4, 4], K [n, 3, 3]).

    Views are rendered with the first training camera's intrinsics, downscaled by an integer
    factor so the longer side is at most `max_side` (an APR's input is small, and rendering is
    the cost), static colour only (no transient, no exposure change: the APR's photometric
    augmentation adds those).
    """
    from fastnefes.render import render_image
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    model, _ = load_run(run_dir, resolve_device(device))
    first = scene.split("train")[0]
    H, W = int(scene.hw[first][0]), int(scene.hw[first][1])
    stride = max(1, -(-max(H, W) // max_side))
    K_full = torch.as_tensor(scene.K[first], dtype=torch.float32)
    K_small = scene.K[first] @ np.diag([1.0 / stride, 1.0 / stride, 1.0])

    @torch.no_grad()
    def render(c2w: np.ndarray):
        c2w = np.asarray(c2w, dtype=np.float64)
        images = []
        for lo in range(0, len(c2w), 8):
            batch = torch.as_tensor(c2w[lo : lo + 8], dtype=torch.float32)
            out = render_image(model, K_full.expand(len(batch), 3, 3), batch, H, W, stride=stride, fused=False)
            images.append((out["rgb"].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy())
        imgs = np.concatenate(images) if images else np.zeros((0, H // stride, W // stride, 3), np.uint8)
        return imgs, c2w, np.repeat(K_small[None], len(c2w), 0)

    return render
