"""`fastnefes train` (a feature field into a run directory) and `fastnefes render` (a split through it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastnefes.cli.app import app, console
from fastnefes.cli.options import DataArg, DeviceOpt, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, SplitOpt, load_scene_from_options
from fastnefes.errors import FastnefesError

EXPERT = "Expert settings"
RunOut = Annotated[Path, typer.Option("--out", help="Run directory to write (config.json, model.safetensors, metrics.json).")]


def _progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _end_table(metrics: dict) -> Table:
    table = Table(title="training")
    for col in ("stage", "steps", "loss", "rgb", "feature", "match", "fusion", "train PSNR"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in metrics["stages"]:
        cells = [f"{s[k]:.4f}" if k in s else "-" for k in ("loss", "rgb", "feature", "match", "fusion")]
        table.add_row(s["name"], str(s["steps"]), *cells, f"{s['psnr']:.2f}" if "psnr" in s else "-")
    val = metrics["val"][-1] if metrics["val"] else None
    caption = f"wall time {metrics['wall_time_s']:.0f} s"
    if val:
        caption += f"; val PSNR {val['psnr']:.2f} dB" + (f" ({val['psnr_act']:.2f} dB with ACT)" if "psnr_act" in val else "")
        caption += f" on {val['views']} views"
    table.caption = caption + "\nmatch: the feature-matching term (InfoNCE for ssl, L1 + cosine for distill)"
    return table


@app.command("train")
def train_field_command(
    data: DataArg,
    out: RunOut,
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    preset: Annotated[str, typer.Option("--preset", help="quick (1000 steps of 8k samples: a first look), default (3000 steps of 32k samples) or long (6000 steps).")] = "default",
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON object of TrainConfig fields over the preset (its \"model\": ModelConfig fields); the options below win over it.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps (default: the preset's).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", min=0.01, help="Train for this many minutes of wall time (loading, validation and checkpoints included) instead of a step count.")] = None,
    device: DeviceOpt = "auto",
    extractor: Annotated[str, typer.Option("--extractor", help="ssl (self-supervised encoder) or PATH.pt (TorchScript extractor to distill).", rich_help_panel=EXPERT)] = "ssl",
    feature_dim: Annotated[Optional[int], typer.Option("--feature-dim", min=1, help="Feature dimension (distill: must match the extractor).", rich_help_panel=EXPERT)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out with its saved config.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.", rich_help_panel=EXPERT)] = 0,
    arch: Annotated[str, typer.Option("--arch", help="hash (fastnefes) or mlp (NeFeS's original sampler: the baseline).", rich_help_panel=EXPERT)] = "hash",
    depth_weight: Annotated[Optional[float], typer.Option("--depth-weight", min=0.0, help="Supervise rendered depth with the data's depth maps at this weight (needs depth registered to the images).", rich_help_panel=EXPERT)] = None,
    distortion_weight: Annotated[Optional[float], typer.Option("--distortion-weight", min=0.0, help="mip-NeRF 360's distortion loss at this weight (gathers each ray's weight at one surface; 0.1 raised the fox's held-out PSNR, see docs/benchmarks.md).", rich_help_panel=EXPERT)] = None,
    keypoint_depth_weight: Annotated[Optional[float], typer.Option("--keypoint-depth-weight", min=0.0, help="Supervise rendered depth at the training images' own triangulated keypoints at this weight (sparse depth, DS-NeRF; for data without depth maps).", rich_help_panel=EXPERT)] = None,
    grid_from_pixels: Annotated[bool, typer.Option("--grid-from-pixels", help="Size the hash grid's finest level to a pixel's footprint at the cameras' typical distance (raises per_level_scale, at most 2; for photographs larger than the grid resolves).", rich_help_panel=EXPERT)] = False,
    space: Annotated[Optional[str], typer.Option("--space", help="Scene parametrisation: auto (chosen from the data), bounded (the content's box) or contracted (a foreground box and the unbounded space around it).", rich_help_panel=EXPERT)] = None,
) -> None:
    """Train a feature field on DATA's train split (progressive NeFeS schedule)."""
    import time

    started = time.perf_counter()  # --minutes is the command's wall time: loading and validation count
    from fastnefes.train import STAGES, train
    from fastnefes.train.run import configure_distill
    from fastnefes.train.sampler import require_depth
    from fastnefes.train.trainer import resolve_device
    from fastnefes.data.options import as_options

    if steps is not None and minutes is not None:
        raise FastnefesError("give --steps or --minutes, not both")
    torch_device = resolve_device(device)  # fails early for --device cuda without CUDA
    data_options = as_options(format, downscale, max_side, focal, sfm_poses)
    if resume:  # the interrupted run's data, as it was loaded
        from fastnefes.train.run import read_data_options

        data_options = data_options.merged_over(read_data_options(out, data))
    from fastnefes.cli.options import json_object_option
    from fastnefes.train.config import train_config

    overrides = json_object_option(str(config_file) if config_file else None, "--config", "TrainConfig fields")
    given = {key: value for key, value in (("depth_weight", depth_weight), ("distortion_weight", distortion_weight),
                                           ("keypoint_depth_weight", keypoint_depth_weight)) if value is not None}
    config = train_config(arch, preset, overrides, where=str(config_file or "train config"), seed=seed,
                          device=str(torch_device), **given)
    scene = data_options.load(data)
    if not scene.split("train"):
        raise FastnefesError(f"{data}: no training images (the train split is empty)")
    if config.depth_weight > 0:
        require_depth(scene)  # before the progress bar, so the error stays one line
    if steps is not None:
        config.steps = steps
    if minutes is not None:
        config.minutes = minutes
    if space is not None:
        config.model.space = space
    if grid_from_pixels:
        config.model.grid_from_pixels = True
    if config.model.space not in ("auto", "bounded", "contracted"):
        raise FastnefesError(f"--space {config.model.space!r}: expected auto, bounded or contracted")
    extractor_module, extractor_path = None, None
    if extractor != "ssl":
        extractor_path = Path(extractor)
        extractor_module = configure_distill(config, extractor_path, feature_dim)
    elif feature_dim is not None:
        config.model.feature_dim = feature_dim
    if resume:
        console.print(f"resuming {out} with its saved configuration")

    with _progress_bar() as bar:
        task = bar.add_task("photometric", total=1.0, info="")
        last_val = {"text": ""}

        def on_event(event: dict) -> None:
            if event["event"] == "val":
                last_val["text"] = f" val {event['psnr']:.2f} dB"
            if event["event"] != "step":
                return
            rays = f"{event['rays_per_s']:.0f} rays/s" if event.get("rays_per_s") else ""
            info = f"step {event['step']}  loss {event.get('loss', float('nan')):.4f}  PSNR {event.get('psnr', float('nan')):.2f}{last_val['text']}  {rays}"
            bar.update(task, completed=event["fraction"], description=STAGES[event["stage"]], info=info)

        _, metrics = train(scene, config, out, resume=resume, extractor=extractor_module, extractor_path=extractor_path,
                           progress=on_event, data_options=data_options, budget_start=started)
        bar.update(task, completed=1.0)
    console.print(_end_table(metrics))
    from fastnefes.train.run import read_config

    from fastnefes.ops.hashgrid.config import HashGridConfig

    saved, norm, _ = read_config(out)
    finest = HashGridConfig.from_dict(saved.model.grid).levels()[-1].resolution
    # The saved space is resolved (ModelConfig.resolve_space): the data's choice unless --space overrode it.
    space = saved.model.space
    chosen = "" if space == norm.space else f" (the data suggested {norm.space})"
    console.print(f"scene box from {norm.source}, {space} space{chosen} ({1 / norm.scale:.3g} units across); "
                  f"finest grid level {finest} cells across; "
                  f"data options: {as_options(format, downscale, max_side, focal, sfm_poses).describe()}")
    if saved.supervises_keypoint_depth:
        console.print(f"keypoint depth: {metrics.get('keypoint_depths', 0)} triangulated keypoints supervised"
                      + (" (none found: no depth supervision)" if not metrics.get("keypoint_depths") else ""))
    console.print(f"run written to {out}")


@app.command("render")
def render_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `fastnefes train`.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder (the one the run was trained on).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs and render.json.")],
    split: SplitOpt = "val",
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    device: DeviceOpt = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Render only the first N images of the split.")] = None,
) -> None:
    """Render a split: RGB, depth and PCA-coloured feature PNGs, a contact sheet, PSNR / SSIM."""
    from fastnefes.train.run import render_split

    from fastnefes.cli.commands_refine import progress_bar

    scene = load_scene_from_options(data, format, downscale, max_side, focal, sfm_poses, run=run)
    with progress_bar() as bar:
        task = bar.add_task(f"render {split}", total=None, info="")

        def on_view(done: int, total: int, psnr: float) -> None:
            bar.update(task, completed=done, total=total, info=f"last view {psnr:.2f} dB")

        result = render_split(run, scene, split, out, device=device, limit=limit, progress=on_view)
    table = Table(title=f"render {split}")
    for col in ("images", "PSNR", "PSNR (ACT)", "SSIM"):
        table.add_column(col, justify="right")
    s = result["summary"]
    table.add_row(str(s["images"]), f"{s['psnr']:.2f}", f"{s['psnr_act']:.2f}" if s.get("psnr_act") is not None else "-", f"{s['ssim']:.4f}")
    console.print(table)
    console.print(f"images in {out} (contact sheet: {out / 'contact_sheet.png'})")
