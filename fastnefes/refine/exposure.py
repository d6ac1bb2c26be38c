"""Exposure matching of a query image to the field's colours, for photometric refinement.

The photometric loss compares the query's pixels with the field's colours as they are: a query
taken with another gain or white balance than the field's average (auto exposure) pulls the pose
toward wherever the field happens to be brighter or darker. The query is therefore mapped to the
field's exposure first, per channel, by matching the mean and standard deviation of its pixels
to those of the field's rendering at a nearby pose. Moments, not a pixel-wise regression: a pose
a few millimetres off shifts the image by a pixel or two, which decorrelates pixels on edges
(diluting a regression's gain toward zero) but hardly changes the moments. Both sides are point
samples (the query's pixel under each ray): an area average would have less contrast than the
rays and bias the gain.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_STD = 1e-3  # a channel flatter than this (in [0, 1]) keeps its gain


@torch.no_grad()
def exposure_to_field(model, image: np.ndarray, K: np.ndarray, c2w: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel gain [3] and bias [3] (in [0, 1] units) mapping the query's colours to the
    field's at pose c2w [4, 4], from the rays of a stride grid (one per stride x stride block,
    through its centre) and the query uint8 [H, W, 3] pixels they pass through (K [3, 3] at the
    image's resolution)."""
    from fastnefes.render import render_image

    H, W = image.shape[:2]
    dev = model.device
    out = render_image(model, torch.as_tensor(K[None], dtype=torch.float32, device=dev),
                       torch.as_tensor(c2w[None], dtype=torch.float32, device=dev), H, W, stride=stride, fused=False,
                       with_features=False)
    rendered = out["rgb"][0].reshape(-1, 3).double().cpu()
    covered = out["opacity"][0].reshape(-1).cpu() > 0.5
    h, w = H // stride, W // stride
    rows = (np.arange(h) * stride + stride // 2)[:, None]  # the pixel holding each ray's centre (i + 0.5) s
    cols = (np.arange(w) * stride + stride // 2)[None, :]
    query = torch.from_numpy(image[rows, cols].reshape(-1, 3).astype(np.float64) / 255.0)
    if int(covered.sum()) < 2:  # nothing of the field in view: leave the query as it is
        return np.ones(3), np.zeros(3)
    rendered, query = rendered[covered], query[covered]
    std_q, std_r = query.std(0), rendered.std(0)
    gain = torch.where(std_q > MIN_STD, std_r / std_q.clamp_min(MIN_STD), torch.ones_like(std_q))
    bias = rendered.mean(0) - gain * query.mean(0)
    return gain.numpy(), bias.numpy()


def apply_exposure_correction(image: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: clip(gain * image + bias), channel by channel, in [0, 1] units."""
    corrected = image.astype(np.float32) / 255.0 * gain.astype(np.float32) + bias.astype(np.float32)
    return np.round(np.clip(corrected, 0.0, 1.0) * 255.0).astype(np.uint8)
