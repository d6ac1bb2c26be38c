"""End-to-end speed of the native ops: a training step and refinement iterations, native vs torch.

    python benchmarks/end_to_end.py --run RUN --data DATA [--repeats 9] [--out results.json]

On a trained run (its occupancy grid and weights give realistic sample counts) this times, with
the backends switched back and forth in one process so both see the same machine state:
- a training step of the run's configuration (photometric stage, its default ray batch),
- a feature-phase refinement iteration (one query, fused features at the encoder's stride,
  forward + backward to the pose),
- a polish iteration (one query, per-ray colour Jacobian at stride 2: forward + 3 backward).
Medians in milliseconds and the torch / native ratio (higher = native faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()

    from fastnefes.data import load_scene
    from fastnefes.geometry import pixel_grid
    from fastnefes.ops.backends import report
    from fastnefes.refine import RefineConfig, Refiner
    from fastnefes.refine.gauss_newton import photometric_jacobian
    from fastnefes.refine.refiner import frozen
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import Trainer
    from fastnefes.geometry import se3_exp

    model, config = load_run(args.run, "cpu")
    scene = load_scene(args.data)
    config.model.n_images = len(scene.split("train"))

    # Training: a copy of the trained model, its grid restored after the Trainer's set-up, at a
    # fixed mid-training step of the photometric stage (no occupancy update falls on it).
    train_model = copy.deepcopy(model).train()
    grid_state = {k: v.clone() for k, v in model.occupancy.state_dict().items()}
    trainer = Trainer(scene, config, train_model)
    train_model.occupancy.load_state_dict(grid_state)
    trainer.state.step = int(0.3 * config.steps) // 16 * 16 + 8 + 64

    q = scene.split("test")[0]
    image = scene.image(q)[None]
    K = torch.tensor(scene.K[q : q + 1], dtype=torch.float32)
    c2w = torch.tensor(scene.c2w[q : q + 1], dtype=torch.float32)
    H, W = image.shape[1:3]
    refiner = Refiner(model, RefineConfig())
    stride = refiner.stride(H, W)
    pixels = pixel_grid(H, W, 2).reshape(-1, 2)

    def train_step():
        trainer.step()

    def feature_iteration():
        with frozen(model):
            target = refiner.encode_queries(image)
            d = torch.zeros(1, 6, requires_grad=True)
            loss = refiner._loss_at(K, c2w @ se3_exp(d), target, H, W, stride)
            torch.autograd.grad(loss.sum(), d)

    def polish_iteration():
        with frozen(model):
            photometric_jacobian(model, K, c2w, torch.zeros(1, 6), pixels)

    cases = {"train_step": train_step, "refine_feature_iteration": feature_iteration,
             "refine_polish_iteration": polish_iteration}
    backends = ("native", "torch")
    times = {c: {b: [] for b in backends} for c in cases}
    for rep in range(args.repeats + 1):  # the first round warms up (extension load, caches)
        for case, fn in cases.items():
            for backend in backends:
                os.environ["FASTNEFES_BACKEND"] = "torch" if backend == "torch" else "auto"
                t = _timed(fn)
                if rep > 0:
                    times[case][backend].append(t)
    os.environ.pop("FASTNEFES_BACKEND", None)
    rows = {}
    for case in cases:
        med = {b: statistics.median(times[case][b]) for b in backends}
        rows[case] = {"native_ms": med["native"], "torch_ms": med["torch"], "ratio": med["torch"] / med["native"]}
        print(f"{case:28s} native {med['native']:9.1f} ms   torch {med['torch']:9.1f} ms   x{rows[case]['ratio']:.2f}")
    result = {"benchmark": "end_to_end", "device": "cpu", "threads": torch.get_num_threads(),
              "machine": platform.platform(), "repeats": args.repeats, "run": args.run,
              "backends_native": report(), "batch_rays": trainer.state.n_rays, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
