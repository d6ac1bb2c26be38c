"""`fastnefes bench refine`: per-query latency, a per-iteration breakdown, batched throughput and
the error after refinement, for a run (and a baseline run of the other arch, side by side).

Every arch sees the same queries (the split's first `queries` views) from the same perturbed
poses, with the same RefineConfig. Latencies are wall times around whole `Refiner.refine` calls
(CUDA synchronised), the first `warmup` excluded; the breakdown times the feature phase's
iterations section by section (fastnefes.timing) on one query.
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
from fastnefes.refine.config import RefineConfig
from fastnefes.refine.refiner import Phase, Refiner
from fastnefes.timing import SectionTimer

SECTIONS = ("encoder", "ray_generation", "sampling", "field_forward", "compositing", "loss", "backward", "optimizer_step")


@dataclass
class RefineBenchConfig:
    split: str = "test"
    queries: int = 8  # latency and error: the split's first N views
    warmup: int = 1  # refinements run before timing (not counted)
    rot_deg: tuple[float, float] = (5.0, 10.0)  # initial perturbation, uniform in these ranges ...
    trans: tuple[float, float] = (0.1, 0.3)  # ... (dataset units)
    seed: int = 0
    breakdown_iters: int = 10
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    throughput_iters: Optional[int] = None  # feature iterations in the throughput runs (None: the config's)
    throughput_polish: bool = True  # False: throughput of the feature phase alone (no photometric polish)
    refine: dict[str, Any] = field(default_factory=dict)  # RefineConfig overrides


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
    """Milliseconds per feature-phase iteration, by section, on one query ([1,H,W,3] etc.)."""
    H, W = image.shape[1:3]
    Kt = torch.as_tensor(K, dtype=torch.float32, device=device)
    init_t = torch.as_tensor(init, dtype=torch.float32, device=device)
    stride = refiner.stride()
    target, enc_s = timed(lambda: refiner.encode_queries(image, "features", stride), device)
    encoder_ms = enc_s * 1e3
    no_stop = Refiner(refiner.model, replace(refiner.config, patience=10**9))
    phase = Phase("features", stride, iters, 0, 1.0)
    delta = torch.zeros(1, 6, device=device)
    failed = torch.zeros(1, dtype=torch.bool)
    count = torch.zeros(1, dtype=torch.long)
    with no_stop.frozen_model():
        no_stop._run_phase(Phase("features", stride, 2, 0, 1.0), Kt, init_t, target, H, W, delta.clone(), failed.clone(),
                           count.clone(), None)  # warm-up
        with SectionTimer(device) as timer:
            _, total_s = timed(lambda: no_stop._run_phase(phase, Kt, init_t, target, H, W, delta, failed, count, None),
                               device)
    per_iter = {name: timer.totals.get(name, 0.0) * 1e3 / iters for name in SECTIONS if name != "encoder"}
    total_ms = total_s * 1e3 / iters
    per_iter["other"] = max(total_ms - sum(per_iter.values()), 0.0)
    return {"iteration_ms": total_ms, "sections_ms": per_iter, "encoder_ms_per_query": encoder_ms,
            "feature_map": [H // stride, W // stride], "iterations": iters}


def bench_refine_run(model, scene: Scene, cfg: RefineBenchConfig, device: torch.device,
                     progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """All figures for one trained model."""
    rcfg = RefineConfig.from_dict({**RefineConfig().to_dict(), **cfg.refine})
    refiner = Refiner(model, rcfg)
    indices, gt, init = _queries(scene, cfg)
    images = np.stack([scene.image(i) for i in indices])
    K = scene.K[indices]
    say = progress or (lambda _msg: None)

    say("per-query latency")
    reset_peak_memory(device)
    latencies, refined, diags = [], [], []
    for n in range(cfg.warmup + len(indices)):
        i = n - cfg.warmup if n >= cfg.warmup else n % len(indices)
        result, secs = timed(lambda: refiner.refine(images[i:i + 1], K[i:i + 1], init[i:i + 1]), device)
        if n >= cfg.warmup:
            latencies.append(secs * 1e3)
            refined.append(result.poses[0])
            diags.append(result.diagnostics[0])
    peak = peak_memory_mb(device)
    t_before, r_before = pose_errors(init, gt)
    t_after, r_after = pose_errors(np.stack(refined), gt)

    say("per-iteration breakdown")
    breakdown = iteration_breakdown(refiner, images[:1], K[:1], init[:1], cfg.breakdown_iters, device)

    throughput = []
    t_cfg = rcfg if cfg.throughput_iters is None else replace(rcfg, iters=cfg.throughput_iters,
                                                              coarse_iters=min(rcfg.coarse_iters, cfg.throughput_iters))
    t_refiner = Refiner(model, t_cfg if cfg.throughput_polish else replace(t_cfg, polish_iters=0))
    for b in cfg.batch_sizes:
        say(f"batch of {b}")
        pick = [j % len(indices) for j in range(b)]
        _, secs = timed(lambda: t_refiner.refine(images[pick], K[pick], init[pick]), device)
        throughput.append({"batch": b, "seconds": secs, "queries_per_s": b / secs})

    return {
        "arch": model.config.arch,
        "queries": [scene.names[i] for i in indices],
        "latency_ms": _percentiles(latencies),
        "iterations_median": statistics.median(d.iterations for d in diags),
        "status_counts": {s: sum(d.status == s for d in diags) for s in sorted({d.status for d in diags})},
        "peak_memory_mb": peak,
        "error_before": {"median_trans": float(np.median(t_before)), "median_rot_deg": float(np.median(r_before))},
        "error_after": {"median_trans": float(np.median(t_after)), "median_rot_deg": float(np.median(r_after))},
        "per_query_error_after": [{"trans": float(t), "rot_deg": float(r)} for t, r in zip(t_after, r_after)],
        "breakdown": breakdown,
        "throughput": throughput,
        "throughput_iters": cfg.throughput_iters or rcfg.iters,
        "throughput_polish": cfg.throughput_polish and rcfg.polish_iters > 0,
        "refine_config": rcfg.to_dict(),
    }


def bench_refine(models: dict[str, Any], scene: Scene, cfg: RefineBenchConfig, device: torch.device,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """models: label -> trained model (e.g. {'hash': ..., 'mlp': ...}); figures per label, and
    the ratios mlp / hash where both are present."""
    rows = {}
    for label, model in models.items():
        rows[label] = bench_refine_run(model, scene, cfg, device,
                                       (lambda msg, lab=label: progress(f"{lab}: {msg}")) if progress else None)
    out: dict[str, Any] = {"config": asdict(cfg), "archs": rows}
    if "hash" in rows and "mlp" in rows:
        h, m = rows["hash"], rows["mlp"]
        out["ratios"] = {
            "iteration_time": m["breakdown"]["iteration_ms"] / h["breakdown"]["iteration_ms"],
            "latency_p50": m["latency_ms"]["p50"] / h["latency_ms"]["p50"],
            "error_after_trans": h["error_after"]["median_trans"] / max(m["error_after"]["median_trans"], 1e-12),
            "error_after_rot": h["error_after"]["median_rot_deg"] / max(m["error_after"]["median_rot_deg"], 1e-12),
        }
    return out
