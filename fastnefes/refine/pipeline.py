"""Refinement of a dataset split: pose files in, pose files + diagnostics out (hloc-style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.refine.config import RefineConfig
from fastnefes.refine.refiner import QueryDiagnostics, Refiner


@dataclass
class SplitRefinement:
    names: list[str]
    init: dict[str, np.ndarray]  # name -> c2w
    refined: dict[str, np.ndarray]
    diagnostics: list[QueryDiagnostics]

    def latency_ms(self) -> dict:
        """Per-query wall time percentiles (ms). In a batch each query is charged the batch's mean."""
        t = np.array([d.wall_time_s for d in self.diagnostics]) * 1e3
        if t.size == 0:
            return {}
        return {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "p99": float(np.percentile(t, 99)),
                "mean": float(t.mean())}

    def status_counts(self) -> dict:
        counts: dict[str, int] = {}
        for d in self.diagnostics:
            counts[d.status] = counts.get(d.status, 0) + 1
        return counts

    def verification(self) -> dict:
        """How many candidates the pixel check turned down, and the confidences."""
        conf = [d.confidence for d in self.diagnostics if d.confidence is not None]
        return {"rejected_by_pixels": sum(d.rejected_by_pixels for d in self.diagnostics),
                "confidence_median": float(np.median(conf)) if conf else None,
                "confidence_min": float(np.min(conf)) if conf else None}

    def to_json(self) -> dict:
        return {
            "latency_ms": self.latency_ms(),
            "status_counts": self.status_counts(),
            "verification": self.verification(),
            "queries": [{"name": n, **d.to_dict()} for n, d in zip(self.names, self.diagnostics)],
        }


def match_init_to_split(scene, split: str, init: dict[str, np.ndarray], init_path: str | Path) -> list[int]:
    """Indices of the split's images named in the init file; every init name must be in the split."""
    index = {scene.names[i]: i for i in scene.split(split)}
    missing = [n for n in init if n not in index]
    if missing:
        raise FastnefesError(f"{init_path}: image {missing[0]!r} is not in the {split} split of {scene.root} ({len(missing)} such names)")
    for name, c2w in init.items():
        R = c2w[:3, :3]
        if not np.all(np.isfinite(c2w)) or not np.allclose(R.T @ R, np.eye(3), atol=1e-3):
            raise FastnefesError(f"{init_path}: pose of {name!r} is not a finite rigid transform")
    return [index[n] for n in init]


def refine_split(
    model,
    scene,
    split: str,
    init: dict[str, np.ndarray],
    config: RefineConfig,
    batch: int = 1,
    apr=None,
    init_path: str | Path = "init",
    on_progress: Optional[Callable[[int], None]] = None,
) -> SplitRefinement:
    """Refine every pose of `init` (names from `split`) against the model; batches of `batch` queries."""
    indices = match_init_to_split(scene, split, init, init_path)
    names = [scene.names[i] for i in indices]
    refiner = Refiner(model, config)
    if config.verify and config.verify_rays > 0:
        from fastnefes.refine.verify import calibrate_pixel_check

        calibrate_pixel_check(model, scene, config.verify_rays)  # the pixel check's absolute floor
    refined: dict[str, np.ndarray] = {}
    start: dict[str, np.ndarray] = {}
    diags: dict[str, QueryDiagnostics] = {}
    done = 0
    for lo in range(0, len(indices), max(1, batch)):
        groups: dict[tuple, list[int]] = {}
        for i in indices[lo : lo + batch]:  # one batched render needs one image size
            groups.setdefault(tuple(int(v) for v in scene.hw[i]), []).append(i)
        for group in groups.values():
            images = np.stack([scene.image(i) for i in group])
            c2w0 = np.stack([init[scene.names[i]] for i in group])
            result = refiner.refine(images, scene.K[group], c2w0, apr=apr)
            for j, i in enumerate(group):
                name = scene.names[i]
                refined[name], start[name], diags[name] = result.poses[j], result.initial[j], result.diagnostics[j]
            done += len(group)
            if on_progress:
                on_progress(done)
    return SplitRefinement(names, {n: start[n] for n in names}, {n: refined[n] for n in names}, [diags[n] for n in names])
