"""What refinement returns: refined poses and per-query diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

STATUS = ("converged", "max_iters", "kept_initial", "failed")


@dataclass
class QueryDiagnostics:
    initial_loss: float  # the first phase's loss (features by default) at the initial pose
    final_loss: float  # the same loss at the returned pose (the polish may raise it a little)
    iterations: int
    wall_time_s: float
    status: str  # one of STATUS
    # The pixel check (fastnefes.refine.verify), None where it did not run: the confidence in
    # [0, 1] of the returned pose, and SSIM / PSNR (dB) of the field's colour vs the query at the
    # initial and the candidate pose, on the pixels both renders cover.
    confidence: Optional[float] = None
    ssim_initial: Optional[float] = None
    ssim_refined: Optional[float] = None
    psnr_initial: Optional[float] = None
    psnr_refined: Optional[float] = None
    rejected_by_pixels: bool = False  # the candidate lowered its loss but matched the query's pixels worse

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class RefineResult:
    poses: np.ndarray  # [B, 4, 4] refined camera-to-world, dataset frame
    initial: np.ndarray  # [B, 4, 4] the starting poses (the APR's prediction for target "apr")
    diagnostics: list[QueryDiagnostics] = field(default_factory=list)
