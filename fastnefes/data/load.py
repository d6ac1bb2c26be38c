"""One entry point for every scene format: detect, load, write."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Optional

from fastnefes.data.formats.cambridge import is_cambridge, load_cambridge, write_cambridge
from fastnefes.data.formats.colmap import is_colmap, load_colmap, write_colmap
from fastnefes.data.formats.seven_scenes import is_7scenes, load_7scenes, write_7scenes
from fastnefes.data.formats.transforms import is_transforms, load_transforms, write_transforms
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError

FORMATS = ("7scenes", "cambridge", "colmap", "transforms")

_LOADERS: dict[str, Callable[..., Scene]] = {
    "7scenes": load_7scenes, "cambridge": load_cambridge, "colmap": load_colmap, "transforms": load_transforms,
}
_WRITERS: dict[str, Callable[..., list]] = {
    "7scenes": write_7scenes, "cambridge": write_cambridge, "colmap": write_colmap, "transforms": write_transforms,
}
_DETECTORS = {"7scenes": is_7scenes, "cambridge": is_cambridge, "colmap": is_colmap, "transforms": is_transforms}
_NEEDS = {
    "7scenes": "TrainSplit.txt / TestSplit.txt",
    "cambridge": "dataset_train.txt / dataset_test.txt",
    "colmap": "sparse/0/cameras.bin|txt (or sparse/)",
    "transforms": "transforms.json or transforms_{train,val,test}.json",
}
ALIASES = {
    "7-scenes": "7scenes", "sevenscenes": "7scenes", "seven_scenes": "7scenes",
    "cambridge_landmarks": "cambridge", "nerf_synthetic": "transforms", "blender": "transforms",
    "instant-ngp": "transforms", "ngp": "transforms", "nerfstudio": "transforms",
}


def canonical_format(name: str) -> str:
    """A format name (or alias) -> one of FORMATS."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        raise FastnefesError(f"unknown format {name!r} (expected auto or one of {', '.join(FORMATS)})")
    return key


def detect_format(root) -> str:
    """The format of a scene folder (or a transforms json file)."""
    root = Path(root)
    if not root.exists():
        raise FastnefesError(f"{root}: not found (expected a scene folder)")
    found = [f for f in FORMATS if _DETECTORS[f](root)]
    if len(found) == 1:
        return found[0]
    if found:
        raise FastnefesError(f"{root}: looks like several formats ({', '.join(found)}); pass --format")
    needs = "; ".join(f"{f}: {n}" for f, n in _NEEDS.items())
    raise FastnefesError(f"{root}: unknown scene format (expected {needs})")


def _call(fn: Callable, fmt: str, *args, **opts):
    params = inspect.signature(fn).parameters
    unknown = [k for k in opts if k not in params]
    if unknown:
        allowed = [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY]
        raise FastnefesError(f"option {unknown[0]!r} does not apply to format {fmt} (options: {', '.join(allowed)})")
    return fn(*args, **opts)


def load_scene(
    path,
    format: str = "auto",
    downscale: float = 1,
    max_side: Optional[int] = None,
    focal: Optional[float] = None,
    **opts,
) -> Scene:
    """Load a scene; `format` is "auto" or one of FORMATS. Extra options go to the loader
    (e.g. sfm_poses for 7scenes, nvm for cambridge, model_dir / test_list for colmap)."""
    fmt = detect_format(path) if format == "auto" else canonical_format(format)
    return _call(_LOADERS[fmt], fmt, path, downscale=downscale, max_side=max_side, focal=focal, **opts)


def write_scene(scene: Scene, out_dir, format: str, **opts) -> list[str]:
    """Write `scene` in `format` (one of FORMATS) to out_dir, atomically (staged then renamed).
    Returns the written image names in scene index order (what `load_scene` will call them)."""
    fmt = canonical_format(format)
    return _call(_WRITERS[fmt], fmt, scene, out_dir, **opts)
