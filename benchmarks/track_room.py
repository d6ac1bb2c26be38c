"""Tracking latency and accuracy on a consecutive-frame sequence, for several per-frame settings.

    fastnefes synth room --format 7scenes --test 60 --test-fps 30
    fastnefes train room --out run --depth-weight 0.5
    python benchmarks/track_room.py --run run --data room --out results.json \
        [--configs '{"default": {}, "more": {"polish_iters": 8}}'] [--repeats 2] [--start-trans 0.01 --start-rot 1]

Tracks the split from its first frame's ground-truth pose (optionally moved by --start-trans in
the scene's units and turned by --start-rot degrees, a different random perturbation for each
repeat) once per setting and repeat, settings interleaved, each a RefineConfig override over the
tracking default (TRACK_FRAME), except "max_coast" and "exposure_stride", the Tracker's own options. Writes, per setting, the tracked frames' latency p50/p95
(segment starts excluded; medians over repeats), the median and max translation / rotation
error over all frames, the share of frames within 2 cm / 0.5 deg (scene units read as metres),
each repeat's median and largest errors and the status counts, plus the machine, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default='{"default": {}}', help="JSON object: name -> RefineConfig overrides over TRACK_FRAME")
    ap.add_argument("--start-config", default="{}", help="RefineConfig overrides over TRACK_START for the first frame")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--start-trans", type=float, default=0.0)
    ap.add_argument("--start-rot", type=float, default=0.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from fastnefes.data import load_scene
    from fastnefes.geometry import perturb_poses, pose_errors
    from fastnefes.refine.sequence import tracking_segments
    from fastnefes.refine.track import TRACK_FRAME, TRACK_START, refine_config, track_split
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # as the CLI does: latencies are what `fastnefes track` users get
    device = resolve_device(args.device)
    model, _ = load_run(args.run, device)
    scene = load_scene(args.data)
    names = [scene.names[i] for i in scene.split(args.split)]
    gt = {n: scene.c2w[i] for n, i in zip(names, scene.split(args.split))}
    first = tracking_segments(names, set(names), args.split, "ground truth")[0].names[0]
    start_cfg = refine_config({**TRACK_START, **json.loads(args.start_config)}, "--start-config")
    settings = json.loads(args.configs)
    # "max_coast" and "exposure_stride" in a setting are the Tracker's, the other keys RefineConfig's.
    tracker = {k: {o: v.pop(o) for o in ("max_coast", "exposure_stride") if o in v} for k, v in settings.items()}
    configs = {k: refine_config({**TRACK_FRAME, **v}, f"--configs {k}") for k, v in settings.items()}

    runs: dict[str, list] = {k: [] for k in configs}
    for rep in range(args.repeats):
        # Each repeat starts from its own perturbation of the first pose (the same for every
        # setting): the repeats sample how the errors depend on where tracking starts.
        start = perturb_poses(gt[first][None], args.start_rot, args.start_trans, seed=rep)[0]
        for name, cfg in configs.items():
            traj = track_split(model, scene, args.split, {first: start}, cfg, start_cfg, tracker_options=tracker[name])
            t, r = pose_errors(np.stack([f.pose for f in traj.frames]), np.stack([gt[f.name] for f in traj.frames]))
            runs[name].append({"latency_ms": traj.latency_ms(), "trans": t, "rot": r, "status": traj.status_counts()})
            lat = traj.latency_ms()
            print(f"{name} (repeat {rep}): p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {t.max() * 100:.2f} cm / "
                  f"{r.max():.3f} deg, median {np.median(t) * 100:.2f} cm / {np.median(r):.3f} deg, {traj.status_counts()}",
                  flush=True)
    results = {}
    for name, rs in runs.items():
        t = np.concatenate([x["trans"] for x in rs])
        r = np.concatenate([x["rot"] for x in rs])
        results[name] = {
            "config": configs[name].to_dict(), "tracker": tracker[name],
            "latency_ms_p50": float(np.median([x["latency_ms"]["p50"] for x in rs])),
            "latency_ms_p95": float(np.median([x["latency_ms"]["p95"] for x in rs])),
            "max_trans": float(t.max()), "max_rot_deg": float(r.max()),
            "within_2cm_0.5deg": float(np.mean((t <= 0.02) & (r <= 0.5))),
            "median_trans": float(np.median(t)), "median_rot_deg": float(np.median(r)),
            "status_counts": [x["status"] for x in rs],
            "per_repeat_median": [[float(np.median(x["trans"])), float(np.median(x["rot"]))] for x in rs],
            "per_repeat_max": [[float(x["trans"].max()), float(x["rot"].max())] for x in rs],
        }
    report = {
        "run": args.run, "data": args.data, "split": args.split, "frames": len(names), "repeats": args.repeats,
        "start_trans": args.start_trans, "start_rot_deg": args.start_rot, "start_config": start_cfg.to_dict(),
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "machine": platform.platform(), "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
