"""Refinement accuracy and per-query latency on a trained run (issue 4's targets).

    python benchmarks/refine_accuracy.py --run RUN --data DATA --out results.json \
        [--rot-deg 5:10 --trans 0.1:0.3] [--limit N] [--batch 1] [--config '{"polish_iters": 0}']

Perturbs the split's ground-truth poses uniformly (seeded; magnitudes in the scene's units),
refines them one query at a time (the latency path) or in batches, and writes the before/after
medians, recall at 5 cm / 5 deg, how much any query was made worse, per-query latency p50/p95
and the machine, as JSON. Train the run first, e.g.
    fastnefes synth room --format 7scenes && fastnefes train room --out run --depth-weight 0.5
(refine_room_cpu.json; without --depth-weight: refine_room_nodepth_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def _range(text: str) -> tuple[float, float] | float:
    lo, _, hi = text.partition(":")
    return (float(lo), float(hi)) if hi else float(lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rot-deg", default="5:10")
    ap.add_argument("--trans", default="0.1:0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N queries only (0 = all)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--config", default="{}", help="RefineConfig overrides as JSON")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from fastnefes.cli.options import load_scene_from_options
    from fastnefes.evaluate import evaluate_poses
    from fastnefes.geometry import perturb_poses, pose_errors
    from fastnefes.refine import RefineConfig, refine_split
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    device = resolve_device(args.device)
    model, _ = load_run(args.run, device)
    scene = load_scene_from_options(Path(args.data), run=Path(args.run))  # as the run was trained (--sfm-poses ...)
    indices = scene.split(args.split)
    if args.limit:
        indices = indices[: args.limit]
    names = [scene.names[i] for i in indices]
    gt = scene.c2w[indices]
    init = perturb_poses(gt, _range(args.rot_deg), _range(args.trans), seed=args.seed)
    cfg = RefineConfig.from_dict({**RefineConfig().to_dict(), **json.loads(args.config)})
    t0 = time.perf_counter()
    result = refine_split(model, scene, args.split, dict(zip(names, init)), cfg, batch=args.batch)
    wall = time.perf_counter() - t0
    refined = np.stack([result.refined[n] for n in names])
    t_before, r_before = pose_errors(init, gt)
    t_after, r_after = pose_errors(refined, gt)
    truth = {n: g for n, g in zip(names, gt)}
    report = {
        "device": str(device), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "run": args.run, "data": args.data, "queries": len(names),
        "perturbation": {"rot_deg": args.rot_deg, "trans": args.trans, "seed": args.seed},
        "config": cfg.to_dict(), "batch": args.batch, "wall_s": wall,
        "before": evaluate_poses(truth, dict(zip(names, init))).summary(),
        "after": evaluate_poses(truth, result.refined).summary(),
        "made_worse_max": {"trans": float(np.max(t_after - t_before)), "rot_deg": float(np.max(r_after - r_before))},
        "latency_ms": result.latency_ms(),
        "status": result.status_counts(),
        "per_query": [{"name": n, "before_t": float(a), "before_r": float(b), "after_t": float(c), "after_r": float(d)}
                      for n, a, b, c, d in zip(names, t_before, r_before, t_after, r_after)],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("queries", "before", "after", "made_worse_max", "latency_ms", "status")}))


if __name__ == "__main__":
    main()
