"""`fastnefes track`: track an ordered image sequence against a trained feature field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastnefes.cli.app import app, console
from fastnefes.cli.options import DeviceOpt, DownscaleOpt, FocalOpt, FormatOpt, MaxSideOpt, SfmPosesOpt, SplitOpt, json_object_option
from fastnefes.errors import FastnefesError


def _running_info(trajectory, gt: Optional[dict]) -> str:
    """Progress text: the running latency of tracked frames and the last frame's error."""
    import numpy as np

    from fastnefes.geometry import pose_errors

    frame = trajectory.frames[-1]
    lat = [f.latency_s for f in trajectory.frames if not f.start] or [frame.latency_s]
    info = f"p50 {np.median(lat) * 1e3:.0f} ms, {frame.diagnostics.status}"
    if gt is not None and frame.name in gt:
        t, r = pose_errors(frame.pose, gt[frame.name])
        info += f", error {float(t):.4f} / {float(r):.2f} deg"
    return info


@app.command("track")
def track_command(
    run: Annotated[Path, typer.Argument(help="Trained run directory (fastnefes train).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder holding the image sequence.")],
    init: Annotated[Path, typer.Option("--init", help="Pose file with the first frame's pose of each sequence; any other frame it names restarts tracking from its pose.")],
    out: Annotated[Path, typer.Option("--out", help="Trajectory pose file to write; per-frame diagnostics go beside it as .json.")],
    split: SplitOpt = "test",
    config: Annotated[Optional[str], typer.Option("--config", help="Per-frame refinement settings over the tracking default: a JSON object of RefineConfig fields, inline or a file.")] = None,
    start_config: Annotated[Optional[str], typer.Option("--start-config", help="Settings of each sequence's first frame over refine's defaults, as --config.")] = None,
    device: DeviceOpt = "auto",
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
) -> None:
    """Track a split's images in sequence order (the last number in each name is the frame
    number), each frame refined from a constant-velocity prediction; writes the trajectory plus
    per-frame diagnostics and latency."""
    import numpy as np

    from fastnefes.cli.commands_data import evaluation_table, scene_poses
    from fastnefes.cli.commands_refine import load_refinement_inputs
    from fastnefes.evaluate import evaluate_poses
    from fastnefes.geometry import pose_errors, read_poses, write_poses
    from fastnefes.io import write_json
    from fastnefes.refine.track import TRACK_FRAME, TRACK_START, Trajectory, refine_config, track_split

    frame_overrides = {**TRACK_FRAME, **json_object_option(config, "--config")}
    start_overrides = {**TRACK_START, **json_object_option(start_config, "--start-config")}
    frame_cfg = refine_config(frame_overrides, "--config")
    start_cfg = refine_config(start_overrides, "--start-config")
    init_poses = read_poses(init)
    model, scene = load_refinement_inputs(run, data, device, format, downscale, max_side, focal, sfm_poses)
    try:
        gt = scene_poses(scene, split)
    except FastnefesError:
        gt = None

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    shown = Trajectory()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"track {split}", total=len(scene.split(split)), info="")

        def on_frame(frame) -> None:
            shown.frames.append(frame)
            bar.update(task, advance=1, info=_running_info(shown, gt))

        trajectory = track_split(model, scene, split, init_poses, frame_cfg, start_cfg, init, on_frame)
    write_poses(out, trajectory.poses)
    report = {"run": str(run), "data": str(data), "split": split, "init": str(init), "device": str(model.device),
              "frame_config": frame_cfg.to_dict(), "start_config": start_cfg.to_dict(), **trajectory.to_json()}
    if gt is not None:
        names = [f.name for f in trajectory.frames]
        truth = {n: gt[n] for n in names}
        before = evaluate_poses(truth, trajectory.predicted).summary()
        after = evaluate_poses(truth, trajectory.poses).summary()
        true = np.stack([truth[n] for n in names])
        t0, r0 = pose_errors(np.stack([f.predicted for f in trajectory.frames]), true)
        t, r = pose_errors(np.stack([f.pose for f in trajectory.frames]), true)
        after["max_trans"], after["max_rot_deg"] = float(t.max()), float(r.max())
        report["evaluation"] = {"before": before, "after": after}
        for k, entry in enumerate(report["frames"]):
            entry.update(trans_err_before=float(t0[k]), rot_err_deg_before=float(r0[k]), trans_err=float(t[k]),
                         rot_err_deg=float(r[k]))
        console.print(evaluation_table("tracking (before: each frame's prediction)", {"before": before, "after": after}))
        console.print(f"max error after: {after['max_trans']:.4f} / {after['max_rot_deg']:.3f} deg")
    json_path = out.with_suffix(".json")
    write_json(json_path, report)
    lat = trajectory.latency_ms()
    if lat:
        console.print(f"latency per tracked frame: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms ({model.device}); "
                      f"status: {trajectory.status_counts()}")
    console.print(f"wrote {out} and {json_path}")
