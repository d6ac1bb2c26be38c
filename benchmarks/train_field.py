"""Benchmark: train a feature field with the default budget and record wall time and val PSNR.

    python benchmarks/train_field.py [--scenes room,lego] [--lego PATH] [--device auto|cpu|cuda]
                                     [--steps N | --minutes M] [--out FILE]

Scenes: `room`, the default synthetic room (make_synthetic_scene() defaults: 160x120, 120 train,
30 test views; val = test); `lego`, a NeRF-synthetic folder (default ../shared/data/lego200 from
the repository root; train on train, score on val). Each run uses the default TrainConfig (the
CPU budget) unless --steps / --minutes override it. Val PSNR is over the whole val split at full
resolution: 'psnr' of the static colour, 'psnr_act' with ACT from each val image's own luma
histogram (NeFeS's test-time use of ACT). Results go to benchmarks/results/train_field_<device>.json.

Targets (2 CPU cores, default budget): room val PSNR >= 25 dB in <= 10 min, lego >= 24 dB in <= 15 min.
"""

from __future__ import annotations

import os

# Shared CPUs: OpenMP threads that spin while waiting for a busy core slow torch down several
# times over; passive waiting must be chosen before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastnefes.data.synth import make_synthetic_scene  # noqa: E402
from fastnefes.train import TrainConfig, train  # noqa: E402
from fastnefes.train.losses import ssim  # noqa: E402
from fastnefes.train.trainer import evaluate_views, resolve_device  # noqa: E402

TARGETS = {"room": {"psnr_db": 25.0, "minutes": 10.0}, "lego": {"psnr_db": 24.0, "minutes": 15.0}}


def backends(device_type: str) -> dict[str, str]:
    from fastnefes.ops import backends as b

    return {row["op"]: row["backend"] for row in b.report(device_type)}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def evaluate(model, scene, split: str) -> dict:
    views = list(evaluate_views(model, scene, scene.split(split)))
    n = len(views)
    out = {"views": n, "psnr": sum(v["psnr"] for v in views) / n,
           "ssim": sum(float(ssim(v["rgb"].permute(2, 0, 1)[None], v["gt"].permute(2, 0, 1)[None])[0]) for v in views) / n}
    if "psnr_act" in views[0]:
        out["psnr_act"] = sum(v["psnr_act"] for v in views) / n
    return out


def run_scene(name: str, scene, args) -> dict:
    config = TrainConfig(device=str(resolve_device(args.device)))
    if args.steps:
        config.steps = args.steps
    if args.minutes:
        config.minutes = args.minutes
    print(f"[{name}] training: {len(scene.split('train'))} images, budget "
          f"{f'{config.minutes} min' if config.minutes else f'{config.steps} steps'} on {config.device}", flush=True)
    start = time.perf_counter()
    last = {"t": start}

    def progress(event: dict) -> None:
        if event["event"] == "step" and time.perf_counter() - last["t"] > 30:
            last["t"] = time.perf_counter()
            print(f"[{name}]   step {event['step']} stage {event['stage'] + 1} psnr {event.get('psnr', 0):.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    model, metrics = train(scene, config, progress=progress)
    train_wall = time.perf_counter() - start
    t0 = time.perf_counter()
    val_split = "val" if scene.split("val") else "test"
    val = evaluate(model, scene, val_split)
    result = {
        "scene": name, "train_images": len(scene.split("train")), "val_split": val_split,
        "image_hw": [int(v) for v in scene.hw[0]], "steps": metrics["steps"],
        "stage_steps": [s["steps"] for s in metrics["stages"]],
        "train_wall_s": round(train_wall, 1), "train_loop_s": round(metrics["wall_time_s"], 1),
        "eval_wall_s": round(time.perf_counter() - t0, 1), "val": val, "target": TARGETS.get(name),
        "config": config.to_dict(), "stages": metrics["stages"],
    }
    if name in TARGETS:
        best = val.get("psnr_act", val["psnr"])
        result["meets_target"] = bool(best >= TARGETS[name]["psnr_db"] and train_wall <= 60 * TARGETS[name]["minutes"])
    print(f"[{name}] {metrics['steps']} steps in {train_wall:.0f} s; val PSNR {val['psnr']:.2f} dB"
          + (f", with ACT {val['psnr_act']:.2f} dB" if "psnr_act" in val else "") + f", SSIM {val['ssim']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", default="room,lego")
    parser.add_argument("--lego", default=str(REPO.parent / "shared" / "data" / "lego200"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"train_field_{device.type}.json"
    report = {"benchmark": "train_field", "command": " ".join(sys.argv), "device": device.type, "machine": machine(),
              "backends": backends(device.type), "runs": []}
    for name in [s.strip() for s in args.scenes.split(",") if s.strip()]:
        if name == "room":
            scene = make_synthetic_scene()
        elif name == "lego":
            from fastnefes.data.load import load_scene

            if not Path(args.lego).is_dir():
                print(f"[lego] skipped: {args.lego} not found", flush=True)
                continue
            scene = load_scene(args.lego)
        else:
            raise SystemExit(f"unknown scene {name!r} (expected room or lego)")
        report["runs"].append(run_scene(name, scene, args))
        from fastnefes.io import write_json

        write_json(out, report)  # after every scene, so a long benchmark leaves partial results
    print(f"results in {out}")


if __name__ == "__main__":
    main()
