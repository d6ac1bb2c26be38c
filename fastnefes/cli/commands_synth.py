"""`fastnefes synth`: render the procedural synthetic room and write it as a dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fastnefes.cli.app import app, console, console_err
from fastnefes.errors import FastnefesError


def _output_format(name: str) -> str:
    from fastnefes.data.load import ALIASES, FORMATS

    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise FastnefesError(f"unknown --format {name!r} (expected one of {', '.join(FORMATS)})")
    return key


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse before rendering what the writer would refuse after it."""
    if out.exists() and not out.is_dir():
        raise FastnefesError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FastnefesError(f"{out}: folder exists and is not empty (choose another output or pass --overwrite)")


@app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Argument(help="Output dataset folder (absent or empty unless --overwrite).")],
    format: Annotated[str, typer.Option("--format", help="7scenes | cambridge | transforms | colmap")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the room layout, textures, paths and exposures.")] = 0,
    width: Annotated[int, typer.Option("--width", help="Image width in pixels.")] = 160,
    height: Annotated[int, typer.Option("--height", help="Image height in pixels.")] = 120,
    train: Annotated[int, typer.Option("--train", help="Number of train images (two sequences).")] = 120,
    test: Annotated[int, typer.Option("--test", help="Number of test images (one separate path).")] = 30,
    test_fps: Annotated[float, typer.Option("--test-fps", min=0.0, help="Test images as consecutive frames of a hand-held walk at this frame rate, one sequence to track (30: a few mm and a fraction of a degree apart); 0 = spread round the room.")] = 0.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
) -> None:
    """Render a synthetic metric indoor room (exact ray casting: RGB, depth, ground-truth poses)
    and write it in a dataset format, so every loader runs on realistic data without downloads."""
    from fastnefes.data import write_scene
    from fastnefes.data.synth import make_synthetic_scene, synthetic_write_options

    fmt = _output_format(format)
    _check_output(out, overwrite)
    options = synthetic_write_options(fmt, train, test_sequence=test if test_fps > 0 else 0)  # refuse before rendering
    start = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console_err, transient=True) as progress:
        task = progress.add_task("rendering", total=train + test)
        scene = make_synthetic_scene(
            seed=seed, width=width, height=height, n_train=train, n_test=test, test_fps=test_fps,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    rendered = time.perf_counter() - start
    with console_err.status(f"writing {fmt} dataset"):
        write_scene(scene, out, fmt, overwrite=overwrite, **options)
    table = Table(title=f"synthetic room, seed {seed}", show_header=False)
    table.add_row("format", fmt)
    table.add_row("images", f"{train} train + {test} test" + (f" (consecutive, {test_fps:g} frames per second)" if test_fps > 0 else ""))
    table.add_row("resolution", f"{width} x {height}, focal {scene.K[0, 0, 0]:.2f} px")
    table.add_row("time", f"{rendered:.1f} s render, {time.perf_counter() - start - rendered:.1f} s write")
    console.print(table)
    console.print(f"wrote {train + test} images ({fmt}) to {out}", soft_wrap=True, highlight=False)
