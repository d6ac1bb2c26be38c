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


def json_object_option(text: Optional[str], option: str, what: str = "RefineConfig settings") -> dict:
    """An option's JSON object, given inline ('{"iters": 50}') or as the path of a JSON file;
    {} when unset. Not JSON, not an object or a missing file: one line naming the option or file."""
    import json

    from fastnefes.errors import FastnefesError
    from fastnefes.io import read_text

    if not text:
        return {}
    where = option
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise FastnefesError(f"{option} {text!r}: neither a JSON object nor a JSON file")
        where, text = str(path), read_text(path, f"a JSON object of {what}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FastnefesError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise FastnefesError(f"{where}: expected a JSON object of {what}, found {type(value).__name__}")
    return value

