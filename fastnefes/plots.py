"""Small plots drawn with OpenCV (no plotting library needed): error scatter with y = x."""

from __future__ import annotations

import math

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def scatter_plot(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
                 size: tuple[int, int] = (420, 520), diagonal: bool = True) -> np.ndarray:
    """An RGB uint8 [H, W, 3] scatter plot of named (x, y) series, with the y = x line.

    Axes start at 0 and share one range (so y = x is the diagonal); points above the line got
    worse, below it better.
    """
    import cv2

    H, W = size
    img = np.full((H, W, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 30, 50
    pw, ph = W - left - right, H - top - bottom
    finite = [v for xs, ys in series.values() for v in np.concatenate([xs, ys]) if np.isfinite(v)]
    hi = max(finite) * 1.05 if finite else 1.0
    hi = hi if hi > 0 else 1.0

    def to_px(x: float, y: float) -> tuple[int, int]:
        return int(left + pw * min(x, hi) / hi), int(top + ph - ph * min(y, hi) / hi)

    black, grey = (0, 0, 0), (200, 200, 200)
    for t in _nice_ticks(0, hi):
        x0, y0 = to_px(t, t)
        cv2.line(img, (x0, top), (x0, top + ph), grey, 1)
        cv2.line(img, (left, y0), (left + pw, y0), grey, 1)
        cv2.putText(img, f"{t:g}", (x0 - 10, top + ph + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.35, black, 1, cv2.LINE_AA)
        cv2.putText(img, f"{t:g}", (5, y0 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), black, 1)
    if diagonal:
        cv2.line(img, to_px(0, 0), to_px(hi, hi), (120, 120, 120), 1, cv2.LINE_AA)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        for x, y in zip(xs, ys):
            if np.isfinite(x) and np.isfinite(y):
                cv2.circle(img, to_px(float(x), float(y)), 3, color, -1, cv2.LINE_AA)
        cv2.circle(img, (left + 10, top + 12 + 16 * k), 4, color, -1, cv2.LINE_AA)
        cv2.putText(img, name, (left + 20, top + 16 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (left + pw // 2 - 60, H - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, black, 1, cv2.LINE_AA)
    ylab = np.full((20, ph), 255, np.uint8)
    cv2.putText(ylab, ylabel, (ph // 2 - 60, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    rot = np.rot90(ylab)  # [ph, 20]
    region = img[top : top + ph, 36:56]
    mask = rot < 128
    region[mask] = 0
    return img


def hstack_images(images: list[np.ndarray], pad: int = 8) -> np.ndarray:
    """Place RGB images side by side on white (heights padded to the tallest)."""
    H = max(im.shape[0] for im in images)
    parts = []
    for im in images:
        canvas = np.full((H, im.shape[1], 3), 255, np.uint8)
        canvas[: im.shape[0]] = im
        parts += [canvas, np.full((H, pad, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)
