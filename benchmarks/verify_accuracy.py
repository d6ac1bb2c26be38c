"""How well the verification step tells good refinements from bad ones.

    python benchmarks/verify_accuracy.py --run RUN --data DATA --out results.json \
        [--rot-deg 5:10 --trans 0.1:0.3 | --trans-frac 0.02:0.05 | --init POSES.txt] [--limit N] [--batch B]
        [--preset NAME] [--config '{...}']

Perturbs the split's ground-truth poses (seeded; --trans in the scene's units, or --trans-frac
as a fraction of the median camera distance to the scene centre), refines them as `fastnefes
refine` does but with the pixel check held back (the raw candidates; the refiner's loss checks
stay), then applies the pixel check as refine does (calibrated on the run's training views) and
scores its verdicts against the truth. --init starts from a pose file instead of perturbations
(e.g. `fastnefes apr predict`'s output; every query of the split must be in it). A candidate is "bad" when it is further from the truth
than its start by more than --worse-trans (scene units; default 1 cm in a metric scene: 0.01) or
--worse-rot-deg (default 0.5). The report gives how many good candidates the check kept, how
many bad ones it caught, the worst regression left unflagged, and the end result as refine
returns it: medians before / after, recall within --within, per-query latency.
Data options default to the run's record (`--sfm-poses` etc. as trained).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
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
    ap.add_argument("--trans-frac", default="", help="translation as a fraction (range) of the median camera distance to the scene centre")
    ap.add_argument("--init", default="", help="initial poses (pose file) instead of perturbed ground truth")
    ap.add_argument("--worse-trans", type=float, default=0.01)
    ap.add_argument("--worse-rot-deg", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preset", default="default", help="RefineConfig preset (fastnefes refine --preset)")
    ap.add_argument("--config", default="{}", help="RefineConfig overrides as JSON, over the preset")
    ap.add_argument("--within", type=lambda t: tuple(float(v) for v in t.split(":")), default=(0.05, 5.0),
                    help="recall thresholds TRANS:DEG (scene units, degrees)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # as the CLI does: latencies are what `fastnefes refine` users get

    from fastnefes.cli.options import load_scene_from_options
    from fastnefes.geometry import perturb_poses, pose_errors
    from fastnefes.refine import RefineConfig, refine_split
    from fastnefes.refine.result import RefineResult
    from fastnefes.refine.verify import apply_verification, calibrate_pixel_check
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    device = resolve_device(args.device)
    model, _ = load_run(args.run, device)
    scene = load_scene_from_options(Path(args.data), run=Path(args.run))
    indices = scene.split(args.split)[: args.limit or None]
    names = [scene.names[i] for i in indices]
    gt = scene.c2w[indices]
    trans = _range(args.trans)
    if args.trans_frac:
        centre = model.normalization.center
        median = float(np.median(np.linalg.norm(scene.c2w[scene.split("train"), :3, 3] - centre, axis=1)))
        frac = _range(args.trans_frac)
        trans = tuple(f * median for f in frac) if isinstance(frac, tuple) else frac * median
    if args.init:
        from fastnefes.geometry import read_poses

        given = read_poses(args.init)
        missing = [n for n in names if n not in given]
        if missing:
            raise SystemExit(f"{args.init}: no pose for {missing[0]} (and {len(missing) - 1} more)")
        init = np.stack([given[n] for n in names])
    else:
        init = perturb_poses(gt, _range(args.rot_deg), trans, seed=args.seed)
    cfg = RefineConfig.preset(args.preset, **json.loads(args.config))
    raw_cfg = replace(cfg, verify_rays=0)  # the refiner's own loss checks stay; the pixel check comes after
    t0 = time.perf_counter()
    result = refine_split(model, scene, args.split, dict(zip(names, init)), raw_cfg, batch=args.batch)
    wall = time.perf_counter() - t0
    candidate = np.stack([result.refined[n] for n in names])
    loss_kept = np.array([d.status not in ("converged", "max_iters") for d in result.diagnostics])
    reference = calibrate_pixel_check(model, scene, cfg.verify_rays)
    diags = [replace(d) for d in result.diagnostics]
    for lo in range(0, len(indices), args.batch):
        rows = list(range(lo, min(lo + args.batch, len(indices))))
        images = np.stack([scene.image(indices[r]) for r in rows])
        part = RefineResult(candidate[rows].copy(), init[rows].copy(), [diags[r] for r in rows])
        apply_verification(model, images, scene.K[indices][rows], part, cfg.verify_rays, cfg.verify_margin,
                           cfg.verify_min_fraction)
    accept = np.array([d.status in ("converged", "max_iters") for d in diags])
    confidence = np.array([d.confidence for d in diags], dtype=float)
    t0_err, r0_err = pose_errors(init, gt)
    t1_err, r1_err = pose_errors(candidate, gt)
    bad = ~loss_kept & ((t1_err > t0_err + args.worse_trans) | (r1_err > r0_err + args.worse_rot_deg))
    good = ~loss_kept & ~bad
    final_t = np.where(accept, t1_err, t0_err)
    final_r = np.where(accept, r1_err, r0_err)
    unflagged_bad = bad & accept
    lim_t, lim_r = args.within
    report = {
        "machine": platform.processor() or platform.machine(), "device": str(device), "threads": torch.get_num_threads(),
        "run": args.run, "data": args.data, "queries": len(names), "refine_wall_s": wall,
        "perturbation": {"init": args.init} if args.init else {"rot_deg": args.rot_deg, "trans": trans, "seed": args.seed},
        "worse_threshold": {"trans": args.worse_trans, "rot_deg": args.worse_rot_deg},
        "config": cfg.to_dict(),
        "pixel_reference_ssim": reference, "kept_by_the_loss_check": int(loss_kept.sum()),
        "good_candidates": int(good.sum()), "good_kept": int((good & accept).sum()),
        "bad_candidates": int(bad.sum()), "bad_caught": int((bad & ~accept).sum()),
        "unflagged_worse_max": {"trans": float(np.max(np.where(unflagged_bad, t1_err - t0_err, 0.0), initial=0.0)),
                                "rot_deg": float(np.max(np.where(unflagged_bad, r1_err - r0_err, 0.0), initial=0.0))},
        "median_before": {"trans": float(np.median(t0_err)), "rot_deg": float(np.median(r0_err))},
        "median_candidate": {"trans": float(np.median(t1_err)), "rot_deg": float(np.median(r1_err))},
        "median_verified": {"trans": float(np.median(final_t)), "rot_deg": float(np.median(final_r))},
        "within": {"trans": lim_t, "rot_deg": lim_r, "before": float(np.mean((t0_err < lim_t) & (r0_err < lim_r))),
                   "verified": float(np.mean((final_t < lim_t) & (final_r < lim_r)))},
        "unflagged_worse": int(unflagged_bad.sum()),
        "latency_ms_p50": result.latency_ms().get("p50"),
        "confidence_good_median": float(np.median(confidence[good])) if good.any() else None,
        "confidence_bad_median": float(np.median(confidence[bad])) if bad.any() else None,
        # ssim: the pixel check's SSIM at the start and at the candidate (the floor is
        # verify_min_fraction times pixel_reference_ssim).
        "per_query": [{"name": n, "before": [float(a), float(b)], "candidate": [float(c), float(d)], "accepted": bool(e),
                       "confidence": float(f), "ssim": [g.ssim_initial, g.ssim_refined]}
                      for n, a, b, c, d, e, f, g in zip(names, t0_err, r0_err, t1_err, r1_err, accept, confidence, diags)],
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    keys = ("queries", "good_candidates", "good_kept", "bad_candidates", "bad_caught", "unflagged_worse_max",
            "median_before", "median_candidate", "median_verified", "within", "unflagged_worse", "kept_by_the_loss_check")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    main()
