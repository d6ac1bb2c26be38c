"""What refinement returns: refined poses and per-query diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

STATUS = ("converged", "max_iters", "kept_initial", "failed")


@dataclass
class QueryDiagnostics:
    initial_loss: float  # the first phase's loss (features by default) at the initial pose
    final_loss: float  # the same loss at the returned pose (the polish may raise it a little)
    iterations: int
    wall_time_s: float
    status: str  # one of STATUS

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class RefineResult:
    poses: np.ndarray  # [B, 4, 4] refined camera-to-world, dataset frame
    initial: np.ndarray  # [B, 4, 4] the starting poses (the APR's prediction for target "apr")
    diagnostics: list[QueryDiagnostics] = field(default_factory=list)
