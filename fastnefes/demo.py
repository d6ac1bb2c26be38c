"""The demo: the whole fastnefes pipeline on the embedded synthetic room.

synthesise (7-Scenes layout on disk) -> train the feature field -> coarse poses (the built-in
APR trained with novel views from the field, or with --quick the ground truth perturbed by
5-10 deg / 10-30 cm) -> refine -> evaluate before / after, with pictures. Budgets are step
counts, not minutes, so the same seed gives the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastnefes.errors import FastnefesError


@dataclass
class DemoPlan:
    width: int
    height: int
    n_train: int
    n_test: int
    field_steps: int
    apr_epochs: Optional[int]  # None: perturb the ground truth instead of training an APR
    refine_batch: int = 8
    stage_fractions: Optional[tuple[float, float, float]] = None  # None: TrainConfig's default split
    polish_iters: Optional[int] = None  # None: RefineConfig's default
    batch_samples: Optional[int] = None  # trained samples per step; None: TrainConfig's default


PLANS = {
    # Fits 3 minutes on 2 CPU cores: fewer steps, more of them on features, 8 polish
    # iterations per level, a quarter of the default samples per step (a step's fixed costs
    # dominate on a CPU) and all 12 queries in one refinement batch.
    "quick": DemoPlan(width=96, height=72, n_train=60, n_test=12, field_steps=1000, apr_epochs=None, refine_batch=12,
                       stage_fractions=(0.4, 0.35, 0.25), polish_iters=8, batch_samples=8192),
    # Fits 15 minutes on 2 CPU cores: half the default samples per step, 130 APR epochs,
    # refinement batches of 15.
    "full": DemoPlan(width=160, height=120, n_train=120, n_test=30, field_steps=3000, apr_epochs=130, refine_batch=15,
                     batch_samples=16384),
}

# --quick perturbation, the refinement issue's benchmark setting (scene units: metres).
QUICK_ROT_DEG = (5.0, 10.0)
QUICK_TRANS = (0.10, 0.30)


def run_demo(out: Path, quick: bool, seed: int = 0, device: str = "cpu",
             say: Callable[[str], None] = print, on_train_event: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the demo into `out`; returns the before / after summaries and the paths written."""
    from fastnefes.data import load_scene, write_scene
    from fastnefes.data.synth import make_synthetic_scene, synthetic_write_options
    from fastnefes.evaluate import evaluate_poses
    from fastnefes.geometry import perturb_poses, write_poses
    from fastnefes.io import write_image, write_json
    from fastnefes.plots import hstack_images, scatter_plot
    from fastnefes.refine import RefineConfig, refine_split
    from fastnefes.train.config import TrainConfig
    from fastnefes.train.run import render_split, train

    plan = PLANS["quick" if quick else "full"]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FastnefesError(f"{out}: folder exists and is not empty (choose another --out)")
    data_dir, run_dir = out / "data", out / "run"

    say(f"[1/5] synthesising a {plan.width}x{plan.height} room: {plan.n_train} train / {plan.n_test} test views")
    synth = make_synthetic_scene(seed=seed, width=plan.width, height=plan.height, n_train=plan.n_train, n_test=plan.n_test)
    write_scene(synth, data_dir, "7scenes", **synthetic_write_options("7scenes", plan.n_train))
    scene = load_scene(data_dir)

    say(f"[2/5] training the feature field ({plan.field_steps} steps)")
    config = TrainConfig(seed=seed, device=device, steps=plan.field_steps)
    if plan.stage_fractions is not None:
        config.stage_fractions = plan.stage_fractions
    if plan.batch_samples is not None:
        config.batch_samples = plan.batch_samples
    model, train_metrics = train(scene, config, run_dir, progress=on_train_event)

    test = scene.split("test")
    names = [scene.names[i] for i in test]
    gt = {n: scene.c2w[i] for n, i in zip(names, test)}
    if plan.apr_epochs is None:
        say(f"[3/5] coarse poses: ground truth perturbed by {QUICK_ROT_DEG[0]:g}-{QUICK_ROT_DEG[1]:g} deg, "
            f"{QUICK_TRANS[0]:g}-{QUICK_TRANS[1]:g} m")
        init_c2w = perturb_poses(np.stack([gt[n] for n in names]), QUICK_ROT_DEG, QUICK_TRANS, seed=seed)
    else:
        from fastnefes.apr import APRConfig, load_apr, novel_views_from_run, train_apr

        say(f"[3/5] training the APR ({plan.apr_epochs} epochs, with novel views rendered from the field)")
        apr_dir = out / "apr"
        train_apr(scene, apr_dir, APRConfig(epochs=plan.apr_epochs, seed=seed), novel_views=novel_views_from_run(run_dir, scene, device),
                  progress=True, device=device)
        apr = load_apr(apr_dir, device)
        init_c2w = apr.predict(np.stack([scene.image(i) for i in test]))
    init = dict(zip(names, init_c2w))
    write_poses(out / "init.txt", init)

    say("[4/5] refining the test poses")
    refine_config = RefineConfig()
    if plan.polish_iters is not None:
        refine_config.polish_iters = plan.polish_iters
    result = refine_split(model, scene, "test", init, refine_config, batch=plan.refine_batch)
    write_poses(out / "refined.txt", result.refined)
    write_json(out / "refined.json", result.to_json())

    say("[5/5] evaluating and drawing")
    before = evaluate_poses(gt, init)
    after = evaluate_poses(gt, result.refined)
    plot = hstack_images([
        scatter_plot({"test views": (before.trans_err, after.trans_err)}, "translation error (m)", "before", "after"),
        scatter_plot({"test views": (before.rot_err, after.rot_err)}, "rotation error (deg)", "before", "after"),
    ])
    write_image(out / "errors.png", plot)
    render_split(run_dir, scene, "test", out / "renders", device=device, limit=6)
    summary = {"before": before.summary(), "after": after.summary(), "field": train_metrics.get("val", {}),
               "latency_ms": result.latency_ms(), "status_counts": result.status_counts(), "seed": seed, "quick": quick}
    write_json(out / "demo.json", summary)
    summary["pictures"] = [str(out / "errors.png"), str(out / "renders" / "contact_sheet.png")]
    return summary
