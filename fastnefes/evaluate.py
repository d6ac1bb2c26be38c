"""Pose evaluation: the numbers every result in fastnefes is judged by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.geometry import pose_errors

# (translation in dataset units, rotation in degrees): 2cm/2deg, 5cm/5deg, 10cm/10deg in a metric scene.
DEFAULT_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.02, 2.0), (0.05, 5.0), (0.10, 10.0))


def parse_thresholds(text: str) -> tuple[tuple[float, float], ...]:
    """'0.02:2,0.05:5' -> ((0.02, 2.0), (0.05, 5.0)): translation (dataset units) : rotation (deg)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            t, r = (float(parts[0]), float(parts[1])) if len(parts) == 2 else (None, None)
        except ValueError:
            t = r = None
        if t is None or not (t > 0 and r > 0):
            raise FastnefesError(f"threshold {item.strip()!r}: expected TRANS:DEG with positive numbers, e.g. 0.05:5")
        out.append((t, r))
    return tuple(out)


@dataclass
class PoseEvaluation:
    names: list[str]  # ground-truth names, in order
    trans_err: np.ndarray  # [N], inf where the prediction is missing
    rot_err: np.ndarray  # [N] degrees, inf where missing
    missing: list[str]
    extra: list[str]  # predictions with no ground truth (ignored)
    thresholds: tuple[tuple[float, float], ...]

    def summary(self) -> dict:
        """Count, medians / means, recalls. Missing predictions count as failures: they enter the
        medians and recalls as infinite errors; the means are over the evaluated images only."""
        n = len(self.names)
        found = np.isfinite(self.trans_err)
        summary = {
            "count": n,
            "evaluated": int(found.sum()),
            "missing": len(self.missing),
            "median_trans": float(np.median(self.trans_err)) if n else float("nan"),
            "median_rot_deg": float(np.median(self.rot_err)) if n else float("nan"),
            "mean_trans": float(self.trans_err[found].mean()) if found.any() else float("nan"),
            "mean_rot_deg": float(self.rot_err[found].mean()) if found.any() else float("nan"),
            "recall": {},
        }
        for t, r in self.thresholds:
            ok = (self.trans_err <= t) & (self.rot_err <= r)
            summary["recall"][f"{t:g}/{r:g}deg"] = float(ok.mean()) if n else float("nan")
        return summary

    def per_image(self) -> list[dict]:
        return [
            {"name": n, "trans_err": (float(t) if np.isfinite(t) else None), "rot_err_deg": (float(r) if np.isfinite(r) else None)}
            for n, t, r in zip(self.names, self.trans_err, self.rot_err)
        ]


def evaluate_poses(
    gt: dict[str, np.ndarray],
    pred: dict[str, np.ndarray],
    thresholds: tuple[tuple[float, float], ...] = DEFAULT_THRESHOLDS,
) -> PoseEvaluation:
    """Compare predicted with ground-truth camera-to-world poses, by image name."""
    if not gt:
        raise FastnefesError("no ground-truth poses to evaluate against")
    names = list(gt)
    trans = np.full(len(names), np.inf)
    rot = np.full(len(names), np.inf)
    present = [i for i, n in enumerate(names) if n in pred]
    if present:
        t, r = pose_errors(np.stack([pred[names[i]] for i in present]), np.stack([gt[names[i]] for i in present]))
        trans[present] = t
        rot[present] = r
    missing = [n for n in names if n not in pred]
    extra = [n for n in pred if n not in gt]
    return PoseEvaluation(names, trans, rot, missing, extra, tuple(thresholds))
