"""Options shared by several commands, so every command spells them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DataArg = Annotated[Path, typer.Argument(help="Dataset folder (7-Scenes, Cambridge, COLMAP or transforms json).")]
FormatOpt = Annotated[str, typer.Option("--format", help="auto | 7scenes | cambridge | colmap | transforms")]
DownscaleOpt = Annotated[int, typer.Option("--downscale", min=1, help="Load images downscaled by this integer factor.")]
MaxSideOpt = Annotated[Optional[int], typer.Option("--max-side", min=8, help="Downscale so the longer image side is at most this.")]
FocalOpt = Annotated[Optional[float], typer.Option("--focal", help="Focal length in pixels at the stored resolution, where the format has none.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train | val | test")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


def load_scene_from_options(data: Path, format: str, downscale: int, max_side: Optional[int], focal: Optional[float]):
    from fastnefes.data import load_scene

    return load_scene(data, format=format, downscale=downscale, max_side=max_side, focal=focal)
