"""The built-in absolute pose regressor (APR): a PoseNet-style CNN trained from scratch per scene.

It gives the refinement pipeline its coarse initial poses when the user has only images and
poses. `fit_apr` / `train_apr` train it, `save_apr` / `load_apr` store it (config.json +
model.safetensors), `check_scene` refuses an APR from another scene, `APR.forward` is the
differentiable image -> pose map that the `apr` refinement target fine-tunes per query.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastnefes.apr.io import check_scene, load_apr, save_apr, scene_fingerprint
from fastnefes.apr.model import APR, APRConfig, rotation_from_6d
from fastnefes.apr.train import NovelViews, error_summary, fit_apr, predict_split, sample_novel_poses, train_apr
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError


def novel_views_from_run(run_dir: str | Path, scene: Scene, device: str = "cpu") -> NovelViews:
    """A novel-view source for `train_apr` from a trained feature-field run (LENS / DFNet style).

    The returned callable `(n, rng) -> (images uint8 [n, H, W, 3], c2w [n, 4, 4], K [n, 3, 3])`
    should render the run's field at `sample_novel_poses(scene.c2w[train], n, rng)` with the
    training camera's intrinsics. Rendering belongs to the render layer, which provides it.
    """
    try:
        from fastnefes.novel_views import novel_view_renderer
    except ImportError as exc:
        raise FastnefesError(
            f"novel views from a field need the render layer (fastnefes.novel_views.novel_view_renderer), "
            f"which this install lacks ({exc}); train the APR without --field"
        ) from None
    train_idx = scene.split("train")
    render = novel_view_renderer(run_dir, scene, device)

    def novel_views(n: int, rng: np.random.Generator):
        c2w = sample_novel_poses(scene.c2w[train_idx], n, rng)
        return render(c2w)

    return novel_views


__all__ = [
    "APR", "APRConfig", "NovelViews", "check_scene", "error_summary", "fit_apr", "load_apr",
    "novel_views_from_run", "predict_split", "rotation_from_6d", "sample_novel_poses", "save_apr",
    "scene_fingerprint", "train_apr",
]
