"""`fastnefes poses`, `perturb`, `eval`: ground truth out, perturbed poses, pose evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from fastnefes.cli.app import app, console, console_err
from fastnefes.cli.options import DataArg, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, SplitOpt, load_scene_from_options
from fastnefes.errors import FastnefesError


def parse_range(text: str, what: str):
    """'5' -> 5.0 ; '5:10' -> (5.0, 10.0)."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(p < 0 or not np.isfinite(p) for p in parts) or (len(parts) == 2 and parts[0] > parts[1]):
        raise FastnefesError(f"{what} {text!r}: expected a non-negative number A or a range A:B with A <= B")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def scene_poses(scene, split: str) -> dict[str, np.ndarray]:
    idx = scene.split(split)
    if not idx:
        raise FastnefesError(f"{scene.root}: split {split!r} has no images")
    return {scene.names[i]: scene.c2w[i] for i in idx}


@app.command("poses")
def poses_command(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Pose file to write (NAME qw qx qy qz tx ty tz).")],
    split: SplitOpt = "test",
    format: FormatOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
) -> None:
    """Export a split's ground-truth poses as a pose file (world-to-camera, dataset frame)."""
    from fastnefes.geometry import write_poses

    scene = load_scene_from_options(data, format, None, None, focal, sfm_poses)
    poses = scene_poses(scene, split)
    write_poses(out, poses)
    console.print(f"wrote {len(poses)} {split} poses of {scene.format} scene {data} to {out}")


@app.command("perturb")
def perturb_command(
    gt: Annotated[Path, typer.Argument(help="Pose file to perturb.")],
    out: Annotated[Path, typer.Option("--out", help="Pose file to write.")],
    rot_deg: Annotated[str, typer.Option("--rot-deg", help="Rotation angle in degrees: A exactly, or A:B uniform.")] = "5",
    trans: Annotated[str, typer.Option("--trans", help="Translation in dataset units: T exactly, or T:U uniform.")] = "0.1",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Perturb every pose by a given rotation (random axis) and translation (random direction)."""
    from fastnefes.geometry import perturb_poses, read_poses, write_poses

    rot = parse_range(rot_deg, "--rot-deg")
    tr = parse_range(trans, "--trans")
    poses = read_poses(gt)
    if not poses:
        raise FastnefesError(f"{gt}: no poses in file")
    perturbed = perturb_poses(np.stack(list(poses.values())), rot, tr, seed=seed)
    write_poses(out, dict(zip(poses, perturbed)))
    console.print(f"wrote {len(poses)} poses perturbed by {rot_deg} deg / {trans} to {out}")


def evaluation_table(title: str, columns: dict[str, dict]) -> Table:
    """A rich table with one column per evaluation summary (e.g. 'before', 'after')."""
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    first = next(iter(columns.values()))
    rows = [
        ("images", lambda s: f"{s['count']}"),
        ("missing", lambda s: f"{s['missing']}"),
        ("median trans", lambda s: f"{s['median_trans']:.4f}"),
        ("median rot (deg)", lambda s: f"{s['median_rot_deg']:.3f}"),
        ("mean trans", lambda s: f"{s['mean_trans']:.4f}"),
        ("mean rot (deg)", lambda s: f"{s['mean_rot_deg']:.3f}"),
    ]
    for key in first["recall"]:
        rows.append((f"recall {key}", lambda s, k=key: f"{100 * s['recall'][k]:.1f}%"))
    for label, fmt in rows:
        table.add_row(label, *[fmt(s) for s in columns.values()])
    return table


def load_ground_truth(gt: Path, split: str, format: Optional[str], focal: Optional[float],
                      sfm_poses: Optional[list[Path]] = None) -> dict[str, np.ndarray]:
    """A pose file, or a dataset folder's split."""
    from fastnefes.geometry import read_poses

    if gt.is_dir():
        return scene_poses(load_scene_from_options(gt, format, None, None, focal, sfm_poses), split)
    return read_poses(gt)


@app.command("eval")
def eval_command(
    gt: Annotated[Path, typer.Option("--gt", help="Ground truth: a dataset folder or a pose file.")],
    pred: Annotated[Path, typer.Option("--pred", help="Predicted pose file.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the numbers as JSON.")] = None,
    split: SplitOpt = "test",
    format: FormatOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
    thresholds: Annotated[Optional[str], typer.Option("--thresholds", help="Recall thresholds TRANS:DEG,... in dataset units (default 0.02:2,0.05:5,0.1:10).")] = None,
) -> None:
    """Median / mean pose errors and recalls of predicted poses against ground truth."""
    from fastnefes.evaluate import DEFAULT_THRESHOLDS, evaluate_poses, parse_thresholds
    from fastnefes.geometry import read_poses
    from fastnefes.io import write_json

    gt_poses = load_ground_truth(gt, split, format, focal, sfm_poses)
    pred_poses = read_poses(pred)
    th = parse_thresholds(thresholds) if thresholds else DEFAULT_THRESHOLDS
    result = evaluate_poses(gt_poses, pred_poses, th)
    summary = result.summary()
    console.print(evaluation_table(f"{pred} vs {gt}", {"pred": summary}))
    if result.missing:
        shown = ", ".join(result.missing[:5]) + (" ..." if len(result.missing) > 5 else "")
        console_err.print(f"[yellow]warning:[/] {len(result.missing)} ground-truth images have no prediction (counted as failures): {shown}")
    if result.extra:
        console_err.print(f"[yellow]warning:[/] {len(result.extra)} predictions have no ground truth and were ignored")
    if json_out:
        write_json(json_out, {"summary": summary, "missing": result.missing, "extra": result.extra, "per_image": result.per_image()})
