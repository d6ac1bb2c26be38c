"""NeFeS's refinement-bounds experiment: how large an initial error can refinement undo?

Ground-truth test poses are perturbed by a sweep of rotation angles (at a fixed small
translation) and of translations (at a fixed small rotation), refined, and the error after is
set against the error before. Running it with both the feature and the RGB (photometric)
signal shows how much the learned features widen the basin of convergence.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fastnefes.geometry import perturb_poses, pose_errors
from fastnefes.refine.config import RefineConfig
from fastnefes.refine.pipeline import refine_split


def default_sweeps(scene_scale: float) -> dict[str, list[tuple[float, float]]]:
    """(rot_deg, trans) pairs. Translations scale with the scene (scene_scale: a typical
    camera-to-content distance in dataset units) so the sweep means the same in any scene."""
    t_small = 0.02 * scene_scale
    return {
        "rotation": [(a, t_small) for a in (2.0, 5.0, 10.0, 15.0, 20.0, 30.0)],
        "translation": [(1.0, f * scene_scale) for f in (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)],
    }


def refinement_bounds(model, scene, split: str, config: RefineConfig, signals=("features", "rgb"),
                      sweeps: dict | None = None, max_queries: int = 8, batch: int = 8, seed: int = 0,
                      on_progress=None) -> dict:
    """Run the sweeps; returns JSON-ready records {signal: [{sweep, rot_deg, trans, before_*, after_*}]}."""
    idx = scene.split(split)[:max_queries]
    names = [scene.names[i] for i in idx]
    gt = scene.c2w[idx]
    if sweeps is None:
        scale = 1.0 / float(model.normalization.scale)  # the unit cube's side in dataset units
        sweeps = default_sweeps(scale)
    records: dict[str, list[dict]] = {s: [] for s in signals}
    step = 0
    for signal in signals:
        cfg = replace(config, signal=signal, target="pose")
        for sweep, pairs in sweeps.items():
            for k, (rot, trans) in enumerate(pairs):
                init = perturb_poses(gt, rot, trans, seed=seed + 1000 * k)
                result = refine_split(model, scene, split, dict(zip(names, init)), cfg, batch=batch)
                refined = np.stack([result.refined[n] for n in names])
                tb, rb = pose_errors(init, gt)
                ta, ra = pose_errors(refined, gt)
                for j, name in enumerate(names):
                    records[signal].append({"sweep": sweep, "name": name, "rot_deg": rot, "trans": trans,
                                            "before_trans": float(tb[j]), "before_rot_deg": float(rb[j]),
                                            "after_trans": float(ta[j]), "after_rot_deg": float(ra[j]),
                                            "status": result.diagnostics[j].status})
                step += 1
                if on_progress:
                    on_progress(step)
    return {"split": split, "queries": names, "config": config.to_dict(), "sweeps": {k: [list(p) for p in v] for k, v in sweeps.items()},
            "records": records}


def success_rate(records: list[dict], trans_thr: float, rot_thr: float) -> dict[str, dict[float, float]]:
    """Per sweep and perturbation magnitude, the fraction of queries refined within thresholds."""
    out: dict[str, dict[float, float]] = {}
    for r in records:
        key = r["rot_deg"] if r["sweep"] == "rotation" else r["trans"]
        ok = r["after_trans"] <= trans_thr and r["after_rot_deg"] <= rot_thr
        out.setdefault(r["sweep"], {}).setdefault(key, []).append(ok)  # type: ignore[arg-type]
    return {s: {k: float(np.mean(v)) for k, v in d.items()} for s, d in out.items()}  # type: ignore[arg-type]


def bounds_plot(result: dict) -> np.ndarray:
    """Two panels: rotation error after vs before (rotation sweep), translation likewise."""
    from fastnefes.plots import hstack_images, scatter_plot

    panels = []
    for sweep, before, after, label in (("rotation", "before_rot_deg", "after_rot_deg", "rotation error (deg)"),
                                        ("translation", "before_trans", "after_trans", "translation error")):
        series = {}
        for signal, recs in result["records"].items():
            rs = [r for r in recs if r["sweep"] == sweep]
            series[signal] = (np.array([r[before] for r in rs]), np.array([r[after] for r in rs]))
        panels.append(scatter_plot(series, f"{sweep} sweep: after vs before", f"{label} before", f"{label} after"))
    return hstack_images(panels)
