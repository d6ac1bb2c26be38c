"""Step rules of the refiner: Adam with independent, freezable rows, and the step-size decay."""

from __future__ import annotations

import math

import torch


class BatchedAdam:
    """Adam over a [B, P] tensor where each row has its own step count and can be frozen.

    torch.optim.Adam keeps moving a parameter with zero gradient through its momentum, so rows
    that stopped early would drift; here frozen rows do not move at all, and a row's trajectory
    does not depend on which other rows share the batch.
    """

    def __init__(self, n_rows: int, lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.lrs = lrs  # [P] per-column step size
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros(n_rows, lrs.numel(), dtype=lrs.dtype, device=lrs.device)
        self.v = torch.zeros_like(self.m)
        self.steps = torch.zeros(n_rows, 1, dtype=lrs.dtype, device=lrs.device)

    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Update param[rows] in place with grad [len(rows), P]; returns the update applied."""
        self.steps[rows] += 1
        t = self.steps[rows]
        self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad * grad
        m_hat = self.m[rows] / (1 - self.b1**t)
        v_hat = self.v[rows] / (1 - self.b2**t)
        update = -scale * self.lrs * m_hat / (v_hat.sqrt() + self.eps)
        param[rows] += update
        return update


def lr_scale(iters: int, it: int, final_fraction: float) -> float:
    """Cosine decay from 1 to final_fraction over a phase's iterations."""
    if iters <= 1:
        return 1.0
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * it / (iters - 1)))
