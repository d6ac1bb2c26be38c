"""`fastnefes refine`: refine coarse poses of a split against a trained feature field."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastnefes.cli.app import app, console
from fastnefes.cli.options import json_object_option, DeviceOpt, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, SplitOpt, load_scene_from_options
from fastnefes.errors import FastnefesError


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def load_refinement_inputs(run: Path, data: Path, device: str, *data_options):
    """(model, scene) with the run's model on the resolved device; data_options as
    load_scene_from_options's (format, downscale, max_side, focal, sfm_poses), each unset one
    taken from the run's record."""
    from fastnefes.train.run import load_run
    from fastnefes.train.trainer import resolve_device

    model, _ = load_run(run, resolve_device(device))
    scene = load_scene_from_options(data, *data_options, run=run)
    return model, scene


def before_after_table(scene, split: str, result) -> Optional[Table]:
    """Evaluation of the initial and refined poses against the split's ground truth."""
    from fastnefes.cli.commands_data import evaluation_table, scene_poses
    from fastnefes.evaluate import evaluate_poses

    gt = scene_poses(scene, split)
    gt = {n: gt[n] for n in result.names}
    before = evaluate_poses(gt, result.init).summary()
    after = evaluate_poses(gt, result.refined).summary()
    return evaluation_table("refinement", {"before": before, "after": after}), before, after


@app.command("refine")
def refine_command(
    run: Annotated[Path, typer.Argument(help="Trained run directory (fastnefes train).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder holding the query images.")],
    out: Annotated[Path, typer.Option("--out", help="Refined pose file to write; diagnostics go beside it as .json.")],
    init: Annotated[Optional[Path], typer.Option("--init", help="Initial pose file (required for --target pose).")] = None,
    split: SplitOpt = "test",
    target: Annotated[str, typer.Option("--target", help="pose: optimise an SE(3) increment; apr: a per-query copy of the APR's weights.")] = "pose",
    apr: Annotated[Optional[Path], typer.Option("--apr", help="APR directory (fastnefes apr train), for --target apr.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="default (= direct: direct alignment against a few rendered keyframes, 4-level RGB polish), nefes (NeFeS: 150 Adam iterations on the features, 3-level RGB polish; the default for --target apr), fast (nefes with 50 iterations) or lm (Levenberg-Marquardt on the features); see docs/refinement.md.")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON object of RefineConfig fields over the preset; the options below win over it.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Feature-phase optimiser: lm (Levenberg-Marquardt), direct (direct alignment against rendered keyframes) or adam (NeFeS).", rich_help_panel="Expert refinement settings")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", min=1, help="Feature-phase renders per query at most, coarse ones included (default 8 keyframes; nefes 150, fast 50, lm 30).", rich_help_panel="Expert refinement settings")] = None,
    band_samples: Annotated[Optional[int], typer.Option("--band-samples", min=0, help="Surface-guided sampling: samples per ray around the surface a phase's first render found (fast: 8; 0 = a full march at every render).", rich_help_panel="Expert refinement settings")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Queries refined together in one batched render.")] = 8,
    loss: Annotated[Optional[str], typer.Option("--loss", help="cosine (default) | robust", rich_help_panel="Expert refinement settings")] = None,
    signal: Annotated[Optional[str], typer.Option("--signal", help="features (default) | rgb (photometric, iNeRF-style)", rich_help_panel="Expert refinement settings")] = None,
    polish_iters: Annotated[Optional[int], typer.Option("--polish-iters", min=0, help="Photometric polish iterations per pyramid level after the feature phase (default 6 keyframe renders; nefes 20 Levenberg-Marquardt iterations; 0 = none).", rich_help_panel="Expert refinement settings")] = None,
    polish_stride: Annotated[Optional[int], typer.Option("--polish-stride", min=1, help="Image pixels per rendered pixel at the finest polish level (default 1, nefes 2; the level before it uses twice that).", rich_help_panel="Expert refinement settings")] = None,
    search_pad: Annotated[Optional[float], typer.Option("--search-pad", min=0.0, help="Rotation search before the feature phase: one render widened by this fraction of the view on every side, the camera turned to the best-matching window (default 0.3; 0 = none).", rich_help_panel="Expert refinement settings")] = None,
    second_opinion: Annotated[bool, typer.Option("--second-opinion", help="A query the rotation search turned also runs the feature phase from its initial pose and keeps the run with the lower loss (costs a phase for each such query; default off).", rich_help_panel="Expert refinement settings")] = False,
    match_rounds: Annotated[Optional[int], typer.Option("--match-rounds", min=0, help="Match-then-solve rounds (feature matches + rendered depth -> PnP) before the feature phase (default 0 = none).", rich_help_panel="Expert refinement settings")] = None,
    restarts: Annotated[Optional[int], typer.Option("--restarts", min=0, help="Extra feature-phase runs from the initial pose (no coarse iterations, step sizes halved per restart); each query keeps its lowest-loss run (default 0).", rich_help_panel="Expert refinement settings")] = None,
    polish_levels: Annotated[Optional[int], typer.Option("--polish-levels", min=1, help="Polish pyramid levels, each at twice the stride of the next, down to --polish-stride (default 4: strides 8, 4, 2, 1; nefes 3).", rich_help_panel="Expert refinement settings")] = None,
    polish_rays: Annotated[Optional[int], typer.Option("--polish-rays", min=0, help="Rays fitted per query and polish level (default 1200): where a level has more pixels, one per block of the grid, the most textured (0 = every pixel).", rich_help_panel="Expert refinement settings")] = None,
    polish_luma: Annotated[bool, typer.Option("--polish-luma", help="Polish on luma only: one backward pass per iteration instead of three (faster, slightly less precise).", rich_help_panel="Expert refinement settings")] = False,
    device: DeviceOpt = "auto",
    distributed: Annotated[bool, typer.Option("--distributed", help="Shard the queries over torchrun's ranks (automatic when torchrun starts several); rank 0 writes the outputs.")] = False,
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
) -> None:
    """Refine initial poses of a split; writes the pose file plus diagnostics and latency."""
    import numpy as np

    from fastnefes.geometry import read_poses, write_poses
    from fastnefes.io import write_json
    from fastnefes.refine import RefineConfig, refine_split

    if target not in ("pose", "apr"):
        raise FastnefesError(f"--target {target!r}: expected pose or apr")
    if loss not in (None, "cosine", "robust"):
        raise FastnefesError(f"--loss {loss!r}: expected cosine or robust")
    if signal not in (None, "features", "rgb"):
        raise FastnefesError(f"--signal {signal!r}: expected features or rgb")
    if target == "pose" and init is None:
        raise FastnefesError("--target pose needs --init (a pose file of initial poses)")
    if target == "apr" and apr is None:
        raise FastnefesError("--target apr needs --apr (an APR directory from fastnefes apr train)")

    from fastnefes.refine.config import checked_config

    file_values = json_object_option(str(config_file) if config_file else None, "--config")
    # The APR target is refined by Adam on the APR's weights: NeFeS's pipeline unless told otherwise.
    preset = preset or ("nefes" if target == "apr" else "default")
    cfg = checked_config(file_values, str(config_file), base=RefineConfig.preset(preset))  # fails before any loading
    if method is not None and method not in ("lm", "adam", "direct"):
        raise FastnefesError(f"--method {method!r}: expected lm, adam or direct")
    if target == "apr" and (method or cfg.method) != "adam":
        raise FastnefesError(f"--target apr is refined by Adam on the APR's weights, not method {method or cfg.method!r} "
                             "(--preset nefes, the default for --target apr)")
    from fastnefes.refine.distributed import refine_split_sharded, start_shard

    shard = start_shard(distributed, device)  # None unless under torchrun: then one rank of a sharded run
    if shard is not None:
        device, console.quiet = shard.device, not shard.is_main
    model, scene = load_refinement_inputs(run, data, device, format, downscale, max_side, focal, sfm_poses)
    apr_model = None
    if target == "apr":
        from fastnefes.apr import check_scene, load_apr

        apr_model = load_apr(apr, model.device)
        check_scene(apr_model, scene)
    if init is not None:
        init_poses = read_poses(init)
    else:  # APR target without an init file: every image of the split; the APR gives the start
        init_poses = {scene.names[i]: np.eye(4) for i in scene.split(split)}
    cfg.target = target
    given = {"loss": loss, "signal": signal, "method": method}
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, value)
    if iters is not None:
        cfg.iters = iters
        cfg.coarse_iters = min(cfg.coarse_iters, iters)
    if band_samples is not None:
        cfg.band_samples = band_samples
    if polish_iters is not None:
        cfg.polish_iters = polish_iters
    if polish_stride is not None:
        cfg.polish_stride = polish_stride
    if polish_levels is not None:
        cfg.polish_levels = polish_levels
    if polish_rays is not None:
        cfg.polish_rays = polish_rays
    cfg.polish_luma = polish_luma or cfg.polish_luma
    if search_pad is not None:
        cfg.search_pad = search_pad
    cfg.search_second_opinion = second_opinion or cfg.search_second_opinion
    if match_rounds is not None:
        cfg.match_rounds = match_rounds
    if restarts is not None:
        cfg.restarts = restarts

    with progress_bar() as bar:
        task = bar.add_task(f"refine ({target}, {signal})", total=len(init_poses), info="")

        def on_progress(done: int) -> None:
            bar.update(task, completed=done)

        refine = refine_split if shard is None else partial(refine_split_sharded, shard)
        result = refine(model, scene, split, init_poses, cfg, batch=batch, apr=apr_model, init_path=init or "APR", on_progress=on_progress)
    if result is None:  # a rank other than 0 of a sharded run: rank 0 writes the outputs
        return
    confidence = {n: d.confidence for n, d in zip(result.names, result.diagnostics)}
    write_poses(out, result.refined, confidence if all(c is not None for c in confidence.values()) else None)
    report = {"run": str(run), "data": str(data), "data_options": scene.load_options, "split": split,
              "device": str(model.device), "config": cfg.to_dict(),
              "batch": batch, "ranks": shard.world_size if shard else 1, **result.to_json()}
    has_gt = True
    try:
        table, before, after = before_after_table(scene, split, result)
        report["evaluation"] = {"before": before, "after": after}
    except FastnefesError:
        has_gt = False
    json_path = out.with_suffix(".json")
    write_json(json_path, report)
    if has_gt:
        console.print(table)
    lat = result.latency_ms()
    console.print(f"latency per query: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms (batch {batch}, {model.device}); "
                  f"status: {result.status_counts()}")
    check = result.verification()
    if check["confidence_median"] is not None:
        console.print(f"pixel check: {check['rejected_by_pixels']} refined pose(s) matched the query worse than the "
                      f"initial one and were not taken; median confidence {check['confidence_median']:.2f}")
    console.print(f"wrote {out} and {json_path}")
