"""Whole-view renders of one refinement call, kept for the steps that render the same view again.

A refinement renders some views more than once: the initial loss, the polish's judge before it
starts and the pixel check all render the initial pose; the judge after the polish, the
reported final loss and the pixel check the refined one. Where their strides agree (tracking's
per-frame setting: every one at a quarter of the resolution) the later renders are the earlier
ones: the model is frozen and in eval mode, so a view renders the same every time. RenderMemo
hands them back instead of rendering again. Only renders without gradients are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_ENTRIES = 16  # views kept per refinement call (oldest dropped first)


class RenderMemo:
    """`render(K, c2w, height, width, stride, fused, with_features)` as fastnefes.render.render_image, reusing an
    earlier result for equal K [B,3,3], c2w [B,4,4] and settings when gradients are off."""

    def __init__(self, model):
        self.model = model
        self._entries: list[tuple[Tensor, Tensor, tuple, dict[str, Tensor]]] = []

    def render(self, K: Tensor, c2w: Tensor, height: int, width: int, stride: int, fused: bool,
               with_features: bool = True) -> dict[str, Tensor]:
        from fastnefes.render import render_image

        if torch.is_grad_enabled():  # a render an optimiser differentiates is its own
            return render_image(self.model, K, c2w, height, width, stride=stride, fused=fused,
                                with_features=with_features)
        settings = (height, width, stride, fused, with_features)
        for k, pose, s, out in self._entries:
            if s == settings and torch.equal(k, K) and torch.equal(pose, c2w):  # False for other shapes
                return out
        out = render_image(self.model, K, c2w, height, width, stride=stride, fused=fused, with_features=with_features)
        self._entries = (self._entries + [(K.detach().clone(), c2w.detach().clone(), settings, out)])[-MAX_ENTRIES:]
        return out
