"""`fastnefes bounds`: NeFeS's refinement-bounds experiment (error after vs error before)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fastnefes.cli.app import app, console
from fastnefes.cli.commands_refine import load_refinement_inputs, progress_bar
from fastnefes.cli.options import DeviceOpt, DownscaleOpt, FocalOpt, SfmPosesOpt, FormatOpt, MaxSideOpt, SplitOpt


@app.command("bounds")
def bounds_command(
    run: Annotated[Path, typer.Argument(help="Trained run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder with ground-truth poses.")],
    out: Annotated[Path, typer.Option("--out", help="Plot to write (PNG); the JSON behind it goes beside it.")],
    split: SplitOpt = "test",
    queries: Annotated[int, typer.Option("--queries", min=1, help="Test images used per perturbation magnitude.")] = 8,
    signals: Annotated[str, typer.Option("--signals", help="Comma-separated: features, rgb.")] = "features,rgb",
    preset: Annotated[str, typer.Option("--preset", help="refine's preset the sweep runs (default = direct, nefes, fast or lm); the options below win over it.")] = "default",
    iters: Annotated[Optional[int], typer.Option("--iters", min=1, help="Main-phase iterations (default: refine's).")] = None,
    polish_iters: Annotated[Optional[int], typer.Option("--polish-iters", min=0, help="Photometric polish iterations per level (default: refine's; 0 compares the signals alone).")] = None,
    search_pad: Annotated[Optional[float], typer.Option("--search-pad", min=0.0, help="Rotation search before the main phase, for every signal (default: refine's; 0 compares the local optimisers alone).")] = None,
    second_opinion: Annotated[bool, typer.Option("--second-opinion", help="With the search: turned queries also run from their initial pose (see refine's --second-opinion).")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
) -> None:
    """Perturb ground-truth poses by a sweep of magnitudes, refine, plot error after vs before."""
    from fastnefes.errors import FastnefesError
    from fastnefes.io import write_image, write_json
    from fastnefes.refine import RefineConfig
    from fastnefes.refine.bounds import bounds_plot, default_sweeps, refinement_bounds, success_rate

    sigs = tuple(s.strip() for s in signals.split(",") if s.strip())
    bad = [s for s in sigs if s not in ("features", "rgb")]
    if bad or not sigs:
        raise FastnefesError(f"--signals {signals!r}: expected a comma-separated list of features, rgb")
    if out.suffix.lower() != ".png":
        raise FastnefesError(f"--out {out}: expected a .png path")
    config = RefineConfig.preset(preset)  # fails before any loading
    model, scene = load_refinement_inputs(run, data, device, format, downscale, max_side, focal, sfm_poses)
    scale = 1.0 / float(model.normalization.scale)
    sweeps = default_sweeps(scale)
    total = len(sigs) * sum(len(v) for v in sweeps.values())
    with progress_bar() as bar:
        task = bar.add_task("bounds", total=total, info=f"{min(queries, len(scene.split(split)))} queries per magnitude")
        config.iters = config.iters if iters is None else iters
        config.polish_iters = config.polish_iters if polish_iters is None else polish_iters
        config.search_pad = config.search_pad if search_pad is None else search_pad
        config.search_second_opinion = second_opinion
        result = refinement_bounds(model, scene, split, config, signals=sigs, sweeps=sweeps,
                                   max_queries=queries, seed=seed, on_progress=lambda k: bar.update(task, completed=k))
    thr_t, thr_r = 0.05 * scale, 5.0  # success: within 5% of the scene size and 5 degrees
    result["success_threshold"] = {"trans": thr_t, "rot_deg": thr_r}
    result["success_rate"] = {s: success_rate(r, thr_t, thr_r) for s, r in result["records"].items()}
    write_image(out, bounds_plot(result))
    write_json(out.with_suffix(".json"), result)
    for sweep, pairs in sweeps.items():
        table = Table(title=f"{sweep} sweep: share refined to within {thr_t:.3g} / {thr_r:g} deg")
        table.add_column("perturbation")
        for s in sigs:
            table.add_column(s, justify="right")
        for rot, trans in pairs:
            key = rot if sweep == "rotation" else trans
            label = f"{rot:g} deg, {trans:.3g}"
            table.add_row(label, *[f"{100 * result['success_rate'][s][sweep][key]:.0f}%" for s in sigs])
        console.print(table)
    console.print(f"wrote {out} and {out.with_suffix('.json')}")
