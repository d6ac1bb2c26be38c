"""`fastnefes bench train` / `fastnefes bench refine`: side-by-side speed of --arch hash and mlp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fastnefes.cli.app import app, console
from fastnefes.cli.options import DataArg, DeviceOpt, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, load_scene_from_options, json_object_option
from fastnefes.errors import FastnefesError

bench_app = typer.Typer(help="Latency and training-speed benchmarks, fastnefes (hash) against NeFeS's design (mlp).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write every figure, the device, backends, versions and commit here.")]
ConfigOpt = Annotated[str, typer.Option("--config", help="Overrides as a JSON object (see the command's help).")]


def _numbers(text: str, what: str, cast=float) -> list:
    try:
        values = [cast(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise FastnefesError(f"{what} {text!r}: expected numbers separated by commas") from None
    if not values or any(v <= 0 for v in values):
        raise FastnefesError(f"{what} {text!r}: expected positive numbers separated by commas")
    return values


def _range(text: str, what: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    try:
        a, b = float(lo), float(hi or lo)
    except ValueError:
        raise FastnefesError(f"{what} {text!r}: expected LO:HI or a single number") from None
    if not 0 <= a <= b:
        raise FastnefesError(f"{what} {text!r}: expected 0 <= LO <= HI")
    return a, b


def _seconds(t: Optional[float]) -> str:
    return "-" if t is None else f"{t:.1f} s"


def _ratio(r: dict) -> str:
    if r["ratio"] is not None:
        return f"{r['ratio']:.1f}x"
    return f"> {r['lower_bound']:.1f}x" if r["lower_bound"] is not None else "-"


def _write(path: Optional[Path], kind: str, device, scene, result: dict) -> None:
    if path is None:
        return
    from fastnefes.bench.environment import environment
    from fastnefes.io import write_json

    write_json(path, {"benchmark": kind, "environment": environment(device),
                      "scene": {"root": str(scene.root), "format": scene.format, "images": len(scene.names)}, **result})
    console.print(f"figures written to {path}")


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def train_table(result: dict) -> Table:
    archs = result["archs"]
    targets = list(next(iter(archs.values()))["time_to_psnr_s"])
    table = Table(title="bench train (training time; validation excluded)")
    for col in ("arch", "steps/s", "rays/s", "samples/s", "peak MiB", *[f"to {t} dB" for t in targets], "best dB"):
        table.add_column(col, justify="left" if col == "arch" else "right")
    for arch, row in archs.items():
        mem = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        table.add_row(arch, f"{row['steps_per_s']:.2f}", _si(row["rays_per_s"]), _si(row["samples_per_s"]), mem,
                      *[_seconds(row["time_to_psnr_s"][t]) for t in targets],
                      "-" if row["best_psnr"] is None else f"{row['best_psnr']:.2f}")
    if "ratios" in result:
        table.add_row("mlp/hash", "", "", "", "", *[_ratio(result["ratios"][t]) for t in targets], "", style="bold")
    budgets = ", ".join(f"{a} {row['budget_minutes']:g} min" for a, row in archs.items())
    table.caption = (f"budgets: {budgets}. Time to a PSNR: first validation at or above it; "
                     "'> Nx': mlp had not reached it within its budget")
    return table


def refine_tables(result: dict) -> list[Table]:
    rows = result["rows"]
    main = Table(title="bench refine")
    first = next(iter(rows.values()))
    batches = [t["batch"] for t in first["throughput"]]
    lim = first["within"]
    for col in ("arch preset", "p50 ms", "p95 ms", "ms / iteration", "iterations", "error before", "error after",
                f"within {lim['trans']:g} / {lim['rot_deg']:g}°", *[f"q/s @{b}" for b in batches]):
        main.add_column(col, justify="left" if col == "arch preset" else "right")
    for label, row in rows.items():
        lat = row["latency_ms"]
        eb, ea = row["error_before"], row["error_after"]
        main.add_row(label, f"{lat['p50']:.0f}", f"{lat['p95']:.0f}", f"{row['breakdown']['iteration_ms']:.1f}",
                     f"{row['iterations_median']:g}", f"{eb['median_trans']:.3g}/{eb['median_rot_deg']:.2f}°",
                     f"{ea['median_trans']:.3g}/{ea['median_rot_deg']:.2f}°", f"{row['within']['fraction']:.0%}",
                     *[f"{t['queries_per_s']:.2f}" for t in row["throughput"]])
    first_label = next(iter(rows))
    ratio_rows = [(f"{label} / {first_label}", r) for label, r in result.get("presets", {}).items()]
    if "end_to_end" in result:
        ratio_rows.append((f"{list(rows)[-1]} / {first_label}", result["end_to_end"]))
    if "ratios" in result:
        ratio_rows.append(("mlp / hash, same preset", result["ratios"]))
    for label, r in ratio_rows:
        main.add_row(label, f"{r['latency_p50']:.1f}x", "", f"{r['iteration_time']:.1f}x", "", "", "", "",
                     *[""] * len(batches), style="bold")
    fm = first["breakdown"]["feature_map"]
    main.caption = (f"median errors (dataset units / degrees) over {first['latency_ms']['n']} queries, rows interleaved; "
                    f"throughput with {first['throughput_iters']} feature iterations"
                    f"{'' if first['throughput_polish'] else ' and no polish'}; feature maps {fm[0]}x{fm[1]}; "
                    f"ms / iteration: one feature-phase render with its optimiser step")
    parts = Table(title="per-iteration breakdown (ms)")
    parts.add_column("section")
    for label in rows:
        parts.add_column(label, justify="right")
    names = list(first["breakdown"]["sections_ms"])
    lines = [("encoder (per query)", [a["breakdown"]["encoder_ms_per_query"] for a in rows.values()])]
    lines += [(n, [a["breakdown"]["sections_ms"][n] for a in rows.values()]) for n in names]
    lines += [("iteration", [a["breakdown"]["iteration_ms"] for a in rows.values()])]
    for name, vals in lines:
        parts.add_row(name, *[f"{v:.2f}" for v in vals])
    return [main, parts]


@bench_app.command("train")
def bench_train_command(
    data: DataArg,
    minutes_hash: Annotated[float, typer.Option("--minutes-hash", min=0.01, help="Training budget of --arch hash.")] = 5.0,
    minutes_mlp: Annotated[float, typer.Option("--minutes-mlp", min=0.01, help="Training budget of --arch mlp.")] = 20.0,
    psnr: Annotated[str, typer.Option("--psnr", help="Validation PSNR targets (dB), comma separated.")] = "20,25",
    archs: Annotated[str, typer.Option("--archs", help="Which archs, comma separated: hash,mlp.")] = "hash,mlp",
    val_views: Annotated[int, typer.Option("--val-views", min=1, help="Validation views (val split, else test).")] = 4,
    config: ConfigOpt = "{}",
    json_out: JsonOpt = None,
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save_runs: Annotated[Optional[Path], typer.Option("--save-runs", help="Save each trained field as a run: DIR/hash, DIR/mlp (for `bench refine`).")] = None,
    stop_when_reached: Annotated[bool, typer.Option("--stop-when-reached", help="Stop an arch once it reached every --psnr target.")] = False,
) -> None:
    """Time to validation PSNRs, steps/s, rays/s, samples/s and peak memory of each arch, in one run.

    --config takes TrainConfig overrides applied to both archs, e.g. '{"model": {"feature_dim": 8}}'.
    """
    from fastnefes.bench import TrainBenchConfig, bench_train
    from fastnefes.train.config import ARCH_PRESETS
    from fastnefes.train.trainer import resolve_device

    arch_list = tuple(a.strip() for a in archs.split(",") if a.strip())
    bad = [a for a in arch_list if a not in ARCH_PRESETS]
    if bad or not arch_list:
        raise FastnefesError(f"--archs {archs!r}: expected a comma-separated subset of {tuple(ARCH_PRESETS)}")
    torch_device = resolve_device(device)
    cfg = TrainBenchConfig(archs=arch_list, minutes={"hash": minutes_hash, "mlp": minutes_mlp},
                           psnr_targets=tuple(_numbers(psnr, "--psnr")), val_views=val_views, seed=seed,
                           overrides=json_object_option(config, "--config"), stop_when_reached=stop_when_reached)
    if save_runs is not None:
        taken = [save_runs / a for a in arch_list if (save_runs / a / "model.safetensors").exists()]
        if taken:
            raise FastnefesError(f"--save-runs {save_runs}: {taken[0]} already holds a run")
    scene = load_scene_from_options(data, format, downscale, max_side, focal, sfm_poses)
    if not scene.split("train"):
        raise FastnefesError(f"{data}: no training images (the train split is empty)")
    with Progress(TextColumn("[bold]{task.description:<6}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {a: bar.add_task(a, total=1.0, info="") for a in arch_list}
        last_val: dict[str, str] = {}

        def on_event(event: dict) -> None:
            arch = event["arch"]
            if event["event"] == "val":
                last_val[arch] = f"  val {event['psnr']:.2f} dB"
            elif event["event"] == "step":
                info = (f"step {event['step']}  loss {event.get('loss', float('nan')):.4f}  PSNR {event.get('psnr', float('nan')):.2f}"
                        f"{last_val.get(arch, '')}  {event['rays_per_s']:.0f} rays/s")
                bar.update(tasks[arch], completed=event["fraction"], info=info)

        result = bench_train(scene, torch_device, cfg, on_event, save_runs)
        for task in tasks.values():
            bar.update(task, completed=1.0)
    console.print(train_table(result))
    _write(json_out, "train", torch_device, scene, result)


@bench_app.command("refine")
def bench_refine_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `fastnefes train`.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder the run was trained on.")],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A run of the other arch (e.g. `train --arch mlp`), measured side by side.")] = None,
    split: Annotated[str, typer.Option("--split", help="Queries come from this split.")] = "test",
    queries: Annotated[int, typer.Option("--queries", min=1, help="Queries for latency and error (the split's first N).")] = 8,
    rot_deg: Annotated[str, typer.Option("--rot-deg", help="Initial rotation error range, LO:HI degrees.")] = "5:10",
    trans: Annotated[str, typer.Option("--trans", help="Initial translation error range, LO:HI dataset units.")] = "0.1:0.3",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes for throughput, comma separated.")] = "1,8,32",
    throughput_iters: Annotated[Optional[int], typer.Option("--throughput-iters", min=1, help="Feature iterations in the throughput runs (default: the refine config's).")] = None,
    throughput_polish: Annotated[bool, typer.Option("--throughput-polish/--throughput-no-polish", help="Include the photometric polish in the throughput runs.")] = True,
    breakdown_iters: Annotated[int, typer.Option("--breakdown-iters", min=1, help="Iterations timed for the per-iteration breakdown.")] = 10,
    presets: Annotated[str, typer.Option("--presets", help="Refinement presets measured side by side on the run, comma separated (the first is the reference of the ratios).")] = "default,nefes",
    baseline_preset: Annotated[str, typer.Option("--baseline-preset", help="The preset of the --baseline run's row (nefes: NeFeS's pipeline).")] = "nefes",
    config: ConfigOpt = "{}",
    json_out: JsonOpt = None,
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Per-query latency (p50/p95/p99), per-iteration breakdown, batched throughput and accuracy
    after refinement, for each --presets on the run (default: default and nefes, side by side
    in one run) and, with --baseline, the other arch's run with --baseline-preset.

    --config takes RefineConfig overrides applied to every row, e.g. '{"polish_iters": 0}'.
    """
    from fastnefes.bench import RefineBenchConfig, bench_refine
    from fastnefes.refine.config import RefineConfig
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    overrides = json_object_option(config, "--config")
    unknown = sorted(set(overrides) - set(RefineConfig().to_dict()))
    if unknown:
        raise FastnefesError(f"--config: unknown refine settings {unknown}")
    RefineConfig.from_dict({**RefineConfig().to_dict(), **overrides})  # validates the values before any work
    from fastnefes.refine.config import PRESETS

    preset_list = tuple(p.strip() for p in presets.split(",") if p.strip())
    bad = [p for p in (*preset_list, baseline_preset) if p not in PRESETS]
    if bad or not preset_list:
        raise FastnefesError(f"--presets {presets!r} / --baseline-preset {baseline_preset!r}: expected names among {', '.join(PRESETS)}")
    cfg = RefineBenchConfig(split=split, queries=queries, rot_deg=_range(rot_deg, "--rot-deg"), trans=_range(trans, "--trans"),
                            seed=seed, breakdown_iters=breakdown_iters, presets=preset_list, baseline_preset=baseline_preset,
                            batch_sizes=tuple(_numbers(batch_sizes, "--batch-sizes", int)),
                            throughput_iters=throughput_iters, throughput_polish=throughput_polish, refine=overrides)
    torch_device = resolve_device(device)
    scene = load_scene_from_options(data, format, downscale, max_side, focal, sfm_poses, run=run)
    models = {}
    for path in [run] + ([baseline] if baseline is not None else []):
        model, _ = load_run(path, torch_device)
        label = model.config.arch
        if label in models:
            raise FastnefesError(f"--baseline {baseline}: both runs are --arch {label}; the baseline must be the other arch")
        models[label] = model
    models = dict(sorted(models.items(), key=lambda kv: kv[0] != "hash"))  # hash first: ratios are mlp / hash
    with console.status("benchmarking refinement") as status:
        result = bench_refine(models, scene, cfg, torch_device, lambda msg: status.update(f"benchmarking refinement: {msg}"))
    for table in refine_tables(result):
        console.print(table)
    _write(json_out, "refine", torch_device, scene, result)
