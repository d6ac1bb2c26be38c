"""Options shared by several commands, so every command spells them the same way.

The data options (--format, --downscale, --max-side, --focal, --sfm-poses) default to "not
given": a command that works on a trained run then loads the data as the run was trained
(fastnefes.data.options), and an explicit option overrides the run's record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DataArg = Annotated[Path, typer.Argument(help="Dataset folder (7-Scenes, Cambridge, COLMAP or transforms json).")]
DATA_PANEL = "Data options (default: as the run was trained)"
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="auto | 7scenes | cambridge | colmap | transforms", rich_help_panel=DATA_PANEL)]
DownscaleOpt = Annotated[Optional[int], typer.Option("--downscale", min=1, help="Load images downscaled by this integer factor.", rich_help_panel=DATA_PANEL)]
MaxSideOpt = Annotated[Optional[int], typer.Option("--max-side", min=8, help="Downscale so the longer image side is at most this.", rich_help_panel=DATA_PANEL)]
FocalOpt = Annotated[Optional[float], typer.Option("--focal", help="Focal length in pixels at the stored resolution, where the format has none.", rich_help_panel=DATA_PANEL)]
SfmPosesOpt = Annotated[Optional[list[Path]], typer.Option("--sfm-poses", help="7-Scenes SfM pseudo ground truth (lines NAME qw qx qy qz tx ty tz f), replacing the dSLAM poses and focal; repeat for the train and test lists.", rich_help_panel=DATA_PANEL)]
SplitOpt = Annotated[str, typer.Option("--split", help="train | val | test")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


def load_scene_from_options(data: Path, format: Optional[str] = None, downscale: Optional[int] = None,
                            max_side: Optional[int] = None, focal: Optional[float] = None,
                            sfm_poses: Optional[list[Path]] = None, run: Optional[Path] = None):
    """The scene at `data` with the given options; with `run`, options not given are the ones
    the run was trained with."""
    from fastnefes.data.options import as_options

    opts = as_options(format, downscale, max_side, focal, sfm_poses)
    if run is not None:
        from fastnefes.train.run import read_data_options

        opts = opts.merged_over(read_data_options(run, data))
    return opts.load(data)
