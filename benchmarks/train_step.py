"""Training steps of the default room with the occupancy march on its pure-torch twin vs the native
kernel, side by side in one process: the same steps from the same trainer state, so both backends
do identical work (their samples are the same, bit for bit).

    python benchmarks/train_step.py [--data DIR] [--warmup 300] [--steps 48] [--threads 1,2]
                                    [--clock wall|cpu] [--json out.json]

Without --data it synthesises the default room (`fastnefes synth room --format 7scenes`) into
--work. It trains `--warmup` steps (so the occupancy grid has been thresholded and has emptied),
snapshots the trainer, then trains two copies of the snapshot `--steps` steps further, one with
FASTNEFES_OCCGRID_BACKEND=torch and one with =native, alternating step by step, for each --threads
count. Reported per thread count: median step time per backend, the median time spent inside the
march per step, the end-to-end ratios (of the medians, and the median of the step-by-step ratios),
and the largest difference between the two copies' losses. `--clock cpu` times the process's
CPU time instead of wall time: with `--threads 1` on a machine shared with other jobs it excludes
the time other processes hold the core.
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

BACKENDS = ("torch", "native")
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
    snapshot, rng = copy.deepcopy(trainer), torch.get_rng_state()

    load_before = os.getloadavg()
    results = [compare(snapshot, rng, clock, n, args.steps) for n in thread_counts]
    if args.json:
        from ops import machine  # benchmarks/ops.py

        write_json(args.json, {"machine": machine(), "clock": args.clock, "load_average_before_after": [load_before[0], os.getloadavg()[0]],
                               "data": str(data), "warmup_steps": args.warmup, "rays_per_step": trainer.state.n_rays,
                               "results": results})


def compare(snapshot, rng: torch.Tensor, clock: MarchClock, threads: int, steps: int) -> dict:
    """`steps` steps from `snapshot` with each march backend, alternating step by step (so both
    see the same machine load): two copies of the trainer, each with its own random state, so
    each copy draws exactly what it would draw alone."""
    torch.set_num_threads(threads)
    runs = {b: {"trainer": copy.deepcopy(snapshot), "rng": rng.clone(), "step": [], "march": [], "loss": []}
            for b in BACKENDS}
    for i in range(steps):
        for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
            run = runs[backend]
            os.environ["FASTNEFES_OCCGRID_BACKEND"] = backend
            torch.set_rng_state(run["rng"])
            step_s, march_s, loss = run_steps(run["trainer"], 1, clock)
            run["rng"] = torch.get_rng_state()
            run["step"] += step_s
            run["march"] += march_s
            run["loss"] += loss
    med = {b: {k: statistics.median(runs[b][k]) * 1e3 for k in ("step", "march")} for b in BACKENDS}
    pairs = [a / b for a, b in zip(runs["torch"]["step"], runs["native"]["step"])]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["native"]["loss"], runs["torch"]["loss"]))
    result = {"threads": threads, "steps": steps, "median_ms": med,
              "step_ratio_torch_over_native": med["torch"]["step"] / med["native"]["step"],
              "median_paired_step_ratio": statistics.median(pairs),
              "march_ratio_torch_over_native": med["torch"]["march"] / med["native"]["march"],
              "max_relative_loss_difference": loss_diff}
    print(f"{threads} threads, {steps} steps: step torch {med['torch']['step']:.0f} ms, native "
          f"{med['native']['step']:.0f} ms -> {result['step_ratio_torch_over_native']:.2f}x end to end (median of "
          f"step-by-step ratios {result['median_paired_step_ratio']:.2f}x); march torch {med['torch']['march']:.1f} ms, "
          f"native {med['native']['march']:.2f} ms -> {result['march_ratio_torch_over_native']:.1f}x; largest "
          f"relative loss difference {loss_diff:.2e}", flush=True)
    return result


if __name__ == "__main__":
    main()
