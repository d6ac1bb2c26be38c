"""`fastnefes apr train` / `fastnefes apr predict`: the built-in absolute pose regressor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fastnefes.cli.app import app, console
from fastnefes.cli.options import DataArg, DeviceOpt, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, SplitOpt, load_scene_from_options
from fastnefes.errors import FastnefesError

apr_app = typer.Typer(help="The built-in absolute pose regressor (coarse poses for refinement).", no_args_is_help=True)
app.add_typer(apr_app, name="apr")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FastnefesError(f"--device {device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FastnefesError(f"--device {device}: CUDA is not available on this machine")
    return device


def errors_table(title: str, rows: dict[str, dict]) -> Table:
    """One row per split: translation (dataset units) / rotation (deg) errors from fastnefes.apr.error_summary."""
    table = Table(title=title)
    for col in ("split", "images", "median", "mean", "p90"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, s in rows.items():
        cells = [f"{s[k + '_trans']:.3f} / {s[k + '_rot_deg']:.2f}°" for k in ("median", "mean", "p90")]
        table.add_row(split, str(s["n"]), *cells)
    table.caption = "translation (dataset units) / rotation error"
    return table


@apr_app.command("train")
def train_command(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="APR folder to write (config.json + model.safetensors).")],
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs (default 200).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", min=0.01, help="Train for this many minutes instead of a number of epochs.")] = None,
    input_height: Annotated[Optional[int], typer.Option("--input-height", min=16, help="APR input image height (width keeps the aspect).")] = None,
    field: Annotated[Optional[Path], typer.Option("--field", help="A trained feature-field run: mix its rendered novel views into training.")] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train a PoseNet-style APR from scratch on the dataset's training images."""
    from dataclasses import replace

    from fastnefes.apr import APRConfig, novel_views_from_run, train_apr

    if epochs is not None and minutes is not None:
        raise FastnefesError("--epochs and --minutes: give one training budget, not both")
    config = APRConfig(seed=seed)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    if minutes is not None:
        config = replace(config, minutes=minutes)
    if input_height is not None:
        config = replace(config, input_height=input_height)
    dev = resolve_device(device)
    scene = load_scene_from_options(data, format, downscale, max_side, focal, sfm_poses, run=field)
    novel = novel_views_from_run(field, scene, dev) if field is not None else None
    metrics = train_apr(scene, out, config, novel_views=novel, progress=True, device=dev)
    rows = {"train": metrics["train"], **({"test": metrics["test"]} if "test" in metrics else {})}
    console.print(errors_table(f"APR on {data}", rows))
    console.print(f"{metrics['epochs']} epochs, {metrics['steps']} steps in {metrics['seconds']:.0f} s; wrote {out}")


@apr_app.command("predict")
def predict_command(
    apr_dir: Annotated[Path, typer.Argument(help="APR folder from `fastnefes apr train`.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder whose images to localise.")],
    out: Annotated[Path, typer.Option("--out", help="Pose file to write (NAME qw qx qy qz tx ty tz).")],
    split: SplitOpt = "test",
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Predict the poses of a split's images; with ground truth, print their errors."""
    import numpy as np

    from fastnefes.apr import check_scene, error_summary, load_apr, predict_split
    from fastnefes.geometry import write_poses

    apr = load_apr(apr_dir, resolve_device(device))
    scene = load_scene_from_options(data, format, downscale, max_side, focal, sfm_poses, run=apr_dir)
    check_scene(apr, scene)
    idx, pred = predict_split(apr, scene, split)
    if not idx:
        raise FastnefesError(f"{data}: split {split!r} has no images")
    write_poses(out, {scene.names[i]: c2w for i, c2w in zip(idx, pred)})
    console.print(f"wrote {len(idx)} {split} poses predicted by {apr_dir} to {out}")
    if np.isfinite(scene.c2w[idx]).all():
        console.print(errors_table(f"APR {apr_dir} on {data} ({split})", {split: error_summary(pred, scene.c2w[idx])}))
