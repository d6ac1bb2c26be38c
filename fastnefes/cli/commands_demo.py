"""`fastnefes demo`: the whole pipeline on the embedded synthetic room."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastnefes.cli.app import app, console


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the data, run, poses and pictures.")] = Path("fastnefes-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller scene and budget; perturbed ground truth instead of an APR (~3 min on 2 cores).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same table.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
) -> None:
    """Synthesise a room, train the field, get coarse poses, refine, and show before / after."""
    from fastnefes.cli.commands_data import evaluation_table
    from fastnefes.demo import run_demo
    from fastnefes.train.trainer import resolve_device

    dev = str(resolve_device(device))
    summary = run_demo(out, quick=quick, seed=seed, device=dev, say=lambda s: console.print(f"[bold cyan]{s}[/]"))
    console.print(evaluation_table("demo: test poses before and after refinement", {"before": summary["before"], "after": summary["after"]}))
    lat = summary["latency_ms"]
    console.print(f"refinement: p50 {lat['p50']:.0f} ms per query ({dev}), status {summary['status_counts']}")
    console.print("pictures: " + ", ".join(summary["pictures"]))
