"""Benchmark: `fastnefes train` then `fastnefes render --split test` on a real scene, timed end to end.

    python benchmarks/train_real.py --data DATA --run RUN [--minutes 15] [--out FILE] [-- TRAIN OPTIONS...]

Runs the two commands exactly as a user would (subprocesses, the installed console script) and
writes one JSON: both command lines, their wall times (the train command's whole run: import,
loading, steps, validation, writing), the steps per stage, the validation curve, and the held-out
PSNR / PSNR with ACT / SSIM over the test split at full resolution with the per-image rows.
Extra arguments after `--` go to `fastnefes train` (e.g. --sfm-poses FILE, --max-side 640).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", required=True, help="run directory to create (must not exist)")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--renders", default=None, help="render folder (default RUN/render_test)")
    parser.add_argument("--out", required=True, help="result JSON")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    exe = [sys.executable, "-m", "fastnefes"]
    renders = args.renders or str(Path(args.run) / "render_test")
    train_cmd = [*exe, "train", args.data, "--out", args.run, "--minutes", f"{args.minutes:g}", *extra]
    render_cmd = [*exe, "render", args.run, "--data", args.data, "--split", "test", "--out", renders]
    train_s = timed(train_cmd)
    render_s = timed(render_cmd)
    metrics = json.loads((Path(args.run) / "metrics.json").read_text())
    config = json.loads((Path(args.run) / "config.json").read_text())
    held_out = json.loads((Path(renders) / "render.json").read_text())
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "train_command": shlex.join(["fastnefes", *train_cmd[3:]]),
        "render_command": shlex.join(["fastnefes", *render_cmd[3:]]),
        "train_command_wall_s": round(train_s, 1), "render_command_wall_s": round(render_s, 1),
        "train_budget_wall_s": round(metrics["wall_time_s"], 1), "steps": metrics["steps"],
        "stages": [{"name": s["name"], "steps": s["steps"]} for s in metrics["stages"]],
        "val": metrics["val"], "normalization": config["normalization"],
        "held_out": held_out["summary"], "held_out_images": held_out["images"],
    }
    try:
        result["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    s = held_out["summary"]
    print(f"train {train_s:.0f} s end to end ({metrics['steps']} steps); held out {s['images']} images: "
          f"PSNR {s['psnr']:.2f} dB, with ACT {s['psnr_act'] or float('nan'):.2f} dB, SSIM {s['ssim']:.3f}")


if __name__ == "__main__":
    main()
