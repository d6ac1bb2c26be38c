"""Training steps of the default room with today's fast paths against their references, side by
side in one process: the same steps from the same trainer state and the same rays.

    python benchmarks/train_step.py [--data DIR] [--warmup 300] [--steps 48] [--threads 1,2]
                                    [--clock wall|cpu] [--json out.json]

Without --data it synthesises the default room (`fastnefes synth room --format 7scenes`) into
--work. It trains `--warmup` steps with the defaults (so the occupancy grid has been thresholded
and has emptied), snapshots the trainer, pins its ray count, then trains copies of the snapshot
`--steps` steps further, taking turns step by step, for each --threads count:
  reference          the pure-torch occupancy march, the culling pre-pass at every step, and
                     torch's multi-tensor Adam;
  native_march       the native march (csrc) instead;
  scheduled_prepass  and the pre-pass only while it pays (fastnefes.ops.occgrid.culling);
  default            and torch's fused Adam: what `fastnefes train` runs.
Reported per thread count: median step time per configuration, the median time inside the march
per step, the end-to-end ratios against the reference (of the medians, and the median of the
step-by-step ratios), and the largest relative difference of each copy's losses from the
reference's (the marches return the same samples bit for bit; the pre-pass changes no rendered
value, only the mean transient density the regulariser averages over samples; the fused Adam
rounds its update differently). `--clock cpu` times the process's CPU time instead of wall time:
with `--threads 1` on a machine shared with other jobs it excludes the time other processes hold
the core.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastnefes.io import write_json  # noqa: E402
from fastnefes.ops._allocator import keep_freed_memory_in_heap  # noqa: E402
from fastnefes.ops.occgrid.culling import CULL_COST  # noqa: E402
from fastnefes.train.trainer import fused_adam  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock_fn = CLOCKS["wall"]


def load_room(data: Path | None, work: Path):
    from fastnefes.cli.options import load_scene_from_options

    if data is None:
        data = work / "room"
        if not data.exists():
            subprocess.run([sys.executable, "-m", "fastnefes", "synth", str(data), "--format", "7scenes"], check=True,
                           stdout=subprocess.DEVNULL)
    return load_scene_from_options(data), data


def make_trainer(scene):
    from fastnefes.data.normalize import compute_normalization
    from fastnefes.train.config import TrainConfig
    from fastnefes.train.run import build_model
    from fastnefes.train.trainer import Trainer

    cfg = TrainConfig()  # `fastnefes train` defaults
    cfg.model.n_images = len(scene.split("train"))
    torch.manual_seed(cfg.seed)
    return Trainer(scene, cfg, build_model(cfg, compute_normalization(scene)))


class MarchClock:
    """Wall time inside the march functions OccupancyGrid.sampling calls."""

    def __init__(self) -> None:
        import fastnefes.ops.occgrid as occgrid

        self.seconds = 0.0
        for name in ("march_rays", "march_rays_native"):
            setattr(occgrid, name, self._timed(getattr(occgrid, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            start = clock_fn()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += clock_fn() - start

        return run


def run_steps(trainer, n: int, clock: MarchClock) -> tuple[list[float], list[float], list[float]]:
    """n training steps as Trainer.run takes them: (step seconds, march seconds, losses)."""
    step_s, march_s, losses = [], [], []
    for _ in range(n):
        clock.seconds = 0.0
        start = clock_fn()
        logged = trainer.step()
        loss = float(logged["loss"])  # the step's own synchronisation point
        step_s.append(clock_fn() - start)
        march_s.append(clock.seconds)
        losses.append(loss)
        trainer.state.step += 1
    return step_s, march_s, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="dataset folder (default: synthesise the default room)")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="where the room is synthesised")
    ap.add_argument("--warmup", type=int, default=300, help="steps trained before the snapshot")
    ap.add_argument("--steps", type=int, default=48, help="timed steps per backend")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: torch's)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time (use with --threads 1)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    global clock_fn
    clock_fn = CLOCKS[args.clock]
    keep_freed_memory_in_heap()
    thread_counts = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    from fastnefes.ops import backends

    scene, data = load_room(args.data, args.work)
    clock = MarchClock()
    trainer = make_trainer(scene)
    os.environ["FASTNEFES_OCCGRID_BACKEND"] = "native"
    if backends.resolve("occgrid", "cpu") != "native":
        raise SystemExit("the native march is unavailable here: see `fastnefes doctor`")
    torch.set_num_threads(thread_counts[0])
    start = time.perf_counter()
    run_steps(trainer, args.warmup, clock)
    print(f"warm-up: {args.warmup} steps in {time.perf_counter() - start:.0f} s, {trainer.state.n_rays} rays a step",
          flush=True)
    trainer.cfg.batch_samples = 0  # the same rays in every configuration from here on
    snapshot, rng = copy.deepcopy(trainer), torch.get_rng_state()

    load_before = os.getloadavg()
    results = [compare(snapshot, rng, clock, n, args.steps) for n in thread_counts]
    if args.json:
        from ops import machine  # benchmarks/ops.py

        write_json(args.json, {"machine": machine(), "clock": args.clock, "load_average_before_after": [load_before[0], os.getloadavg()[0]],
                               "data": str(data), "warmup_steps": args.warmup, "rays_per_step": trainer.state.n_rays,
                               "results": results})


# configuration -> (march backend, culling break-even: 0 runs the pre-pass at every step, fused Adam);
# each row adds one fast path to the one before.
CONFIGS = {"reference": ("torch", 0.0, False), "native_march": ("native", 0.0, False),
           "scheduled_prepass": ("native", CULL_COST, False), "default": ("native", CULL_COST, True)}


def with_adam(trainer, fused: bool) -> None:
    """Give the trainer a fused or a multi-tensor Adam with its optimiser's settings and state."""
    old = trainer.optimizer
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in old.param_groups]
    new = fused_adam(groups) if fused else torch.optim.Adam(groups, foreach=True)
    for param, state in old.state.items():
        new.state[param] = {k: v.clone() for k, v in state.items()}
    trainer.optimizer = new


def compare(snapshot, rng: torch.Tensor, clock: MarchClock, threads: int, steps: int) -> dict:
    """`steps` steps from `snapshot` in each configuration, taking turns step by step (so all see
    the same machine load): one copy of the trainer each, each with its own random state, so each
    copy draws exactly what it would draw alone."""
    torch.set_num_threads(threads)
    runs = {}
    for name, (_, break_even, fused) in CONFIGS.items():
        trainer = copy.deepcopy(snapshot)
        trainer.model.occupancy.culling.break_even = break_even
        with_adam(trainer, fused)
        runs[name] = {"trainer": trainer, "rng": rng.clone(), "step": [], "march": [], "loss": []}
    names = list(CONFIGS)
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            run = runs[name]
            os.environ["FASTNEFES_OCCGRID_BACKEND"] = CONFIGS[name][0]
            torch.set_rng_state(run["rng"])
            step_s, march_s, loss = run_steps(run["trainer"], 1, clock)
            run["rng"] = torch.get_rng_state()
            run["step"] += step_s
            run["march"] += march_s
            run["loss"] += loss
    med = {n: {k: statistics.median(runs[n][k]) * 1e3 for k in ("step", "march")} for n in names}
    ref = runs["reference"]
    result = {"threads": threads, "steps": steps, "median_ms": med, "step_ratio_over_reference": {},
              "median_paired_step_ratio": {}, "max_relative_loss_difference": {}}
    for name in names[1:]:
        pairs = [a / b for a, b in zip(ref["step"], runs[name]["step"])]
        result["step_ratio_over_reference"][name] = med["reference"]["step"] / med[name]["step"]
        result["median_paired_step_ratio"][name] = statistics.median(pairs)
        result["max_relative_loss_difference"][name] = max(abs(a - b) / max(abs(b), 1e-12)
                                                           for a, b in zip(runs[name]["loss"], ref["loss"]))
    result["march_ratio_torch_over_native"] = med["reference"]["march"] / med["native_march"]["march"]
    print(f"{threads} threads, {steps} steps: " + ", ".join(f"{n} {med[n]['step']:.1f} ms" for n in names)
          + "; over the reference: " + ", ".join(f"{n} {result['step_ratio_over_reference'][n]:.2f}x "
                                                 f"(paired {result['median_paired_step_ratio'][n]:.2f}x)" for n in names[1:])
          + f"; march torch {med['reference']['march']:.1f} ms, native {med['native_march']['march']:.2f} ms "
          f"({result['march_ratio_torch_over_native']:.1f}x); largest relative loss differences "
          + ", ".join(f"{n} {v:.1e}" for n, v in result["max_relative_loss_difference"].items()), flush=True)
    return result


if __name__ == "__main__":
    main()
