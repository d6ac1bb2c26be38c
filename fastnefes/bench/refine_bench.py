"""`fastnefes bench refine`: per-query latency, a per-iteration breakdown, batched throughput and
the accuracy after refinement, for refinement presets side by side (default and nefes by
default) and for a baseline run of the other arch (its nefes row: NeFeS's design and pipeline).

Every row sees the same queries (the split's first `queries` views) from the same perturbed
poses. Latencies are wall times around whole `Refiner.refine` calls (CUDA synchronised), the
rows interleaved query by query so that they share the machine's state, the first `warmup`
calls of each row excluded; the breakdown times the feature phase's renders section by section
(fastnefes.timing) on one query.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch

from fastnefes.bench.environment import peak_memory_mb, reset_peak_memory, timed
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import perturb_poses, pose_errors
from fastnefes.refine.config import PRESETS, RefineConfig
from fastnefes.refine.refiner import Phase, Refiner
from fastnefes.timing import SectionTimer

SECTIONS = ("encoder", "ray_generation", "sampling", "field_forward", "compositing", "loss", "backward", "optimizer_step")


@dataclass
class RefineBenchConfig:
    split: str = "test"
    queries: int = 8  # latency and error: the split's first N views
    warmup: int = 1  # refinements per row run before timing (not counted)
    rot_deg: tuple[float, float] = (5.0, 10.0)  # initial perturbation, uniform in these ranges ...
    trans: tuple[float, float] = (0.1, 0.3)  # ... (dataset units)
    seed: int = 0
    breakdown_iters: int = 10
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    throughput_iters: Optional[int] = None  # feature iterations in the throughput runs (None: the config's)
    throughput_polish: bool = True  # False: throughput of the feature phase alone (no photometric polish)
    presets: tuple[str, ...] = ("default", "nefes")  # rows of the run's arch (RefineConfig.preset)
    baseline_preset: str = "nefes"  # the row of the baseline arch
    within: tuple[float, float] = (0.05, 5.0)  # recall thresholds: dataset units, degrees
    refine: dict[str, Any] = field(default_factory=dict)  # RefineConfig overrides for every row


def _percentiles(ms: list[float]) -> dict[str, Optional[float]]:
    if not ms:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "n": len(ms)}


def _queries(scene: Scene, cfg: RefineBenchConfig) -> tuple[list[int], np.ndarray, np.ndarray]:
    indices = scene.split(cfg.split)[: cfg.queries]
    if not indices:
        raise FastnefesError(f"bench refine: the {cfg.split!r} split is empty")
    gt = scene.c2w[indices]
    return indices, gt, perturb_poses(gt, tuple(cfg.rot_deg), tuple(cfg.trans), seed=cfg.seed)


def iteration_breakdown(refiner: Refiner, image: np.ndarray, K: np.ndarray, init: np.ndarray, iters: int,
                        device: torch.device) -> dict[str, Any]:
    """Milliseconds per feature-phase render (an optimiser iteration), by section, on one query
    ([1,H,W,3] etc.), with the refiner's method and sampling; early stops are off."""
    H, W = image.shape[1:3]
    Kt = torch.as_tensor(K, dtype=torch.float32, device=device)
    init_t = torch.as_tensor(init, dtype=torch.float32, device=device)
    stride = refiner.stride(H, W)
    target, enc_s = timed(lambda: refiner.encode_queries(image, "features", stride), device)
    no_stop = Refiner(refiner.model, replace(refiner.config, patience=10**9, tol_rot_deg=0.0, tol_trans=0.0))
    method = refiner.config.method
    phase = Phase("features", stride, iters, 0, 1.0, method)
    delta = torch.zeros(1, 6, device=device)
    failed = torch.zeros(1, dtype=torch.bool)
    count = torch.zeros(1, dtype=torch.long)
    with no_stop.frozen_model():
        no_stop._run_phase(Phase("features", stride, 2, 0, 1.0, method), Kt, init_t, target, H, W, delta.clone(),
                           failed.clone(), count.clone(), None)  # warm-up
        with SectionTimer(device) as timer:
            _, total_s = timed(lambda: no_stop._run_phase(phase, Kt, init_t, target, H, W, delta, failed, count, None),
                               device)
    n = max(int(count.sum()), 1)  # a Levenberg-Marquardt phase can stop when no step lowers the loss
    per_iter = {name: timer.totals.get(name, 0.0) * 1e3 / n for name in SECTIONS if name != "encoder"}
    total_ms = total_s * 1e3 / n
    per_iter["other"] = max(total_ms - sum(per_iter.values()), 0.0)
    return {"iteration_ms": total_ms, "sections_ms": per_iter, "encoder_ms_per_query": enc_s * 1e3,
            "feature_map": [H // stride, W // stride], "iterations": n, "method": method}


@dataclass
class _Row:
    label: str
    model: Any
    refiner: Refiner
    latencies: list = field(default_factory=list)
    refined: list = field(default_factory=list)
    diags: list = field(default_factory=list)


def _rows(models: dict[str, Any], cfg: RefineBenchConfig) -> list[_Row]:
    """hash first (each preset), then the baseline arch (its preset); labels 'arch preset'."""
    rows = []
    for arch, model in models.items():
        for preset in (cfg.presets if arch == next(iter(models)) else (cfg.baseline_preset,)):
            rows.append(_Row(f"{arch} {preset}", model, Refiner(model, RefineConfig.preset(preset, **cfg.refine))))
    return rows


def _figures(row: _Row, scene: Scene, cfg: RefineBenchConfig, indices, gt, init, images, K, device,
             say: Callable[[str], None]) -> dict[str, Any]:
    rcfg = row.refiner.config
    t_before, r_before = pose_errors(init, gt)
    t_after, r_after = pose_errors(np.stack(row.refined), gt)
    say(f"{row.label}: per-iteration breakdown")
    breakdown = iteration_breakdown(row.refiner, images[:1], K[:1], init[:1], cfg.breakdown_iters, device)
    throughput = []
    t_cfg = rcfg if cfg.throughput_iters is None else replace(rcfg, iters=cfg.throughput_iters,
                                                              coarse_iters=min(rcfg.coarse_iters, cfg.throughput_iters))
    t_refiner = Refiner(row.model, t_cfg if cfg.throughput_polish else replace(t_cfg, polish_iters=0))
    for b in cfg.batch_sizes:
        say(f"{row.label}: batch of {b}")
        pick = [j % len(indices) for j in range(b)]
        _, secs = timed(lambda: t_refiner.refine(images[pick], K[pick], init[pick]), device)
        throughput.append({"batch": b, "seconds": secs, "queries_per_s": b / secs})
    lim_t, lim_r = cfg.within
    return {
        "arch": row.model.config.arch,
        "preset": row.label.split(" ", 1)[1],
        "queries": [scene.names[i] for i in indices],
        "latency_ms": _percentiles(row.latencies),
        "iterations_median": statistics.median(d.iterations for d in row.diags),
        "status_counts": {s: sum(d.status == s for d in row.diags) for s in sorted({d.status for d in row.diags})},
        "error_before": {"median_trans": float(np.median(t_before)), "median_rot_deg": float(np.median(r_before))},
        "error_after": {"median_trans": float(np.median(t_after)), "median_rot_deg": float(np.median(r_after))},
        "within": {"trans": lim_t, "rot_deg": lim_r, "fraction": float(np.mean((t_after < lim_t) & (r_after < lim_r)))},
        "per_query_error_after": [{"trans": float(t), "rot_deg": float(r)} for t, r in zip(t_after, r_after)],
        "breakdown": breakdown,
        "throughput": throughput,
        "throughput_iters": cfg.throughput_iters or rcfg.iters,
        "throughput_polish": cfg.throughput_polish and rcfg.polish_iters > 0,
        "refine_config": rcfg.to_dict(),
    }


def _ratio(num: dict, den: dict) -> dict[str, float]:
    """num / den of the latency p50 and the time per iteration; error_after_*: den's median error
    after refinement / num's."""
    return {
        "latency_p50": num["latency_ms"]["p50"] / den["latency_ms"]["p50"],
        "iteration_time": num["breakdown"]["iteration_ms"] / den["breakdown"]["iteration_ms"],
        "error_after_trans": den["error_after"]["median_trans"] / max(num["error_after"]["median_trans"], 1e-12),
        "error_after_rot": den["error_after"]["median_rot_deg"] / max(num["error_after"]["median_rot_deg"], 1e-12),
    }


def bench_refine(models: dict[str, Any], scene: Scene, cfg: RefineBenchConfig, device: torch.device,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """models: arch -> trained model, the run's arch first (e.g. {'hash': ..., 'mlp': ...}).

    Returns per row ('hash default', 'hash nefes', 'mlp nefes', ...) the figures, `archs`
    (per arch, the row of its first preset), and ratios: `ratios` mlp / hash under the same
    preset (the baseline's), `presets` (each other preset / the first, same arch) and
    `end_to_end` (the baseline arch's row / the run's first row: NeFeS's design against
    fastnefes's defaults).
    """
    unknown = [p for p in (*cfg.presets, cfg.baseline_preset) if p not in PRESETS]
    if unknown or not cfg.presets:
        raise FastnefesError(f"bench refine: presets {list(cfg.presets)} / baseline {cfg.baseline_preset!r}: "
                             f"expected names among {', '.join(PRESETS)}")
    say = progress or (lambda _msg: None)
    rows = _rows(models, cfg)
    from fastnefes.refine.verify import calibrate_pixel_check

    for row in rows:  # as refine does: the pixel check's floor from the training views
        if row.refiner.config.verify and row.refiner.config.verify_rays > 0:
            calibrate_pixel_check(row.model, scene, row.refiner.config.verify_rays)
    indices, gt, init = _queries(scene, cfg)
    images = np.stack([scene.image(i) for i in indices])
    K = scene.K[indices]

    say("per-query latency (rows interleaved)")
    reset_peak_memory(device)
    for n in range(cfg.warmup + len(indices)):
        i = n - cfg.warmup if n >= cfg.warmup else n % len(indices)
        for row in rows:
            result, secs = timed(lambda: row.refiner.refine(images[i:i + 1], K[i:i + 1], init[i:i + 1]), device)
            if n >= cfg.warmup:
                row.latencies.append(secs * 1e3)
                row.refined.append(result.poses[0])
                row.diags.append(result.diagnostics[0])
    peak = peak_memory_mb(device)
    figures = {row.label: _figures(row, scene, cfg, indices, gt, init, images, K, device, say) for row in rows}
    for row in figures.values():
        row["peak_memory_mb"] = peak  # one process: the largest of all rows
    out: dict[str, Any] = {"config": asdict(cfg), "rows": figures, "archs": {}}
    for label, row in figures.items():
        out["archs"].setdefault(row["arch"], row)
    first = next(iter(figures.values()))
    out["presets"] = {label: _ratio(row, first) for label, row in figures.items()
                      if row["arch"] == first["arch"] and row is not first}
    if len(models) == 2:
        base_arch = list(models)[1]
        baseline = figures[f"{base_arch} {cfg.baseline_preset}"]
        out["end_to_end"] = _ratio(baseline, first)
        same = figures.get(f"{first['arch']} {cfg.baseline_preset}")
        if same is not None:
            out["ratios"] = _ratio(baseline, same)
    return out
