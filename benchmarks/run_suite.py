"""The whole benchmark suite on one machine: `fastnefes bench train` then `bench refine`, both archs.

    python benchmarks/run_suite.py [--data PATH] [--work DIR] [--minutes-hash 5] [--minutes-mlp 20]
                                   [--queries 8] [--throughput-iters N] [--no-throughput-polish]

Without --data it synthesises the default scene (`fastnefes synth room --format 7scenes`); with
it, any dataset fastnefes loads (e.g. a NeRF-synthetic scene, where --trans is in its units).
Writes benchmarks/results/<device>.json (both benchmarks' full JSON) and <device>.md (the tables
the README quotes). Each stage is a CLI call with plain files in between, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def _t(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def markdown(train: dict, refine: dict) -> str:
    env = train["environment"]
    lines = [f"Device: **{env['device']}**, torch {env['torch']}, commit `{env['commit']}`; "
             f"backends: " + ", ".join(f"{k} {v}" for k, v in env["backends"].items()) + ".", ""]
    archs = train["archs"]
    targets = list(next(iter(archs.values()))["time_to_psnr_s"])
    lines += ["| training | budget | steps/s | rays/s | samples/s | peak MiB | " + " | ".join(f"to {t} dB" for t in targets)
              + " | best val PSNR |", "|---" * (7 + len(targets)) + "|"]
    for arch, r in archs.items():
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {arch} | {r['budget_minutes']:g} min | {r['steps_per_s']:.2f} | {r['rays_per_s']:.0f} | "
                     f"{r['samples_per_s']:.3g} | {mem} | " + " | ".join(_t(r["time_to_psnr_s"][t]) for t in targets)
                     + f" | {r['best_psnr']:.2f} |")
    if "ratios" in train:
        cells = []
        for t in targets:
            q = train["ratios"][t]
            cells.append(f"{q['ratio']:.1f}x" if q["ratio"] is not None else
                         (f"> {q['lower_bound']:.1f}x" if q["lower_bound"] is not None else "-"))
        lines.append("| mlp / hash | | | | | | " + " | ".join(cells) + " | |")
    lines.append("")
    rows = refine["rows"]
    first = next(iter(rows.values()))
    batches = [t["batch"] for t in first["throughput"]]
    lines += ["| refinement | p50 ms | p95 ms | p99 ms | ms / iteration | iterations | error before | error after | within | "
              + " | ".join(f"queries/s @{b}" for b in batches) + " |", "|---" * (9 + len(batches)) + "|"]
    for label, r in rows.items():
        lat, eb, ea = r["latency_ms"], r["error_before"], r["error_after"]
        lines.append(f"| {label} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} | {r['breakdown']['iteration_ms']:.1f} | "
                     f"{r['iterations_median']:g} | {eb['median_trans']:.3f} / {eb['median_rot_deg']:.2f}° | "
                     f"{ea['median_trans']:.4f} / {ea['median_rot_deg']:.3f}° | {r['within']['fraction']:.0%} | "
                     + " | ".join(f"{t['queries_per_s']:.2f}" for t in r["throughput"]) + " |")
    first_label = next(iter(rows))
    ratio_rows = [(f"{label} / {first_label}", q) for label, q in refine.get("presets", {}).items()]
    if "end_to_end" in refine:
        ratio_rows.append((f"{list(rows)[-1]} / {first_label}", refine["end_to_end"]))
    if "ratios" in refine:
        ratio_rows.append(("mlp / hash, same preset", refine["ratios"]))
    for label, q in ratio_rows:
        lines.append(f"| {label} | {q['latency_p50']:.1f}x | | | {q['iteration_time']:.1f}x | | | | | " + " | " * (len(batches) - 1) + " |")
    fm = first["breakdown"]["feature_map"]
    lines += ["", f"Errors: medians over {first['latency_ms']['n']} queries (dataset units / degrees); feature maps "
              f"{fm[0]}x{fm[1]}; throughput with {first['throughput_iters']} feature iterations"
              + ("" if first["throughput_polish"] else " and no photometric polish") + ".", ""]
    names = list(first["breakdown"]["sections_ms"]) + ["iteration"]
    lines += ["| ms per iteration | " + " | ".join(rows) + " |", "|---" * (1 + len(rows)) + "|"]
    for n in names:
        vals = [r["breakdown"]["iteration_ms"] if n == "iteration" else r["breakdown"]["sections_ms"][n] for r in rows.values()]
        lines.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="dataset folder (default: synthesise the default room)")
    ap.add_argument("--work", default="bench-work", help="scratch folder for the scene and the trained runs")
    ap.add_argument("--minutes-hash", type=float, default=5.0)
    ap.add_argument("--minutes-mlp", type=float, default=20.0)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--trans", default="0.1:0.3")
    ap.add_argument("--rot-deg", default="5:10")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--throughput-iters", type=int, default=None)
    ap.add_argument("--no-throughput-polish", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastnefes.bench.environment import device_slug
    from fastnefes.train.trainer import resolve_device

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "fastnefes"]
    data = Path(args.data) if args.data else work / "room"
    if not args.data and not data.exists():
        run(exe + ["synth", str(data), "--format", "7scenes"])
    runs = work / "runs"
    if runs.exists():
        raise SystemExit(f"{runs} exists: remove it or pass another --work")
    run(exe + ["bench", "train", str(data), "--minutes-hash", str(args.minutes_hash), "--minutes-mlp", str(args.minutes_mlp),
               "--save-runs", str(runs), "--json", str(work / "train.json"), "--device", args.device])
    refine_cmd = exe + ["bench", "refine", str(runs / "hash"), "--data", str(data), "--baseline", str(runs / "mlp"),
                        "--queries", str(args.queries), "--trans", args.trans, "--rot-deg", args.rot_deg,
                        "--batch-sizes", args.batch_sizes, "--json", str(work / "refine.json"), "--device", args.device]
    if args.throughput_iters:
        refine_cmd += ["--throughput-iters", str(args.throughput_iters)]
    if args.no_throughput_polish:
        refine_cmd += ["--throughput-no-polish"]
    run(refine_cmd)

    train = json.loads((work / "train.json").read_text())
    refine = json.loads((work / "refine.json").read_text())
    slug = device_slug(torch.device(resolve_device(args.device)))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug}.json").write_text(json.dumps({"train": train, "refine": refine}, indent=2) + "\n")
    (out / f"{slug}.md").write_text(markdown(train, refine))
    print(f"written {out / (slug + '.json')} and {out / (slug + '.md')}")


if __name__ == "__main__":
    main()
