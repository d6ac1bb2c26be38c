"""Saving and loading APRs, and telling whether an APR belongs to a scene.

An APR folder holds `config.json` (format tag, APR config, input size, the training scene's
fingerprint, training metrics) and `model.safetensors` (weights and frame buffers). Both are
written atomically; loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fastnefes.apr.model import APR, APRConfig
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import pose_errors
from fastnefes.io import atomic_path, read_json, write_json

FORMAT = "fastnefes-apr"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Poses of the same image in two scenes further apart than this are another scene: a fraction
# of the training cameras' bounding-box diagonal, and degrees.
POSE_TOLERANCE = 0.01
ROT_TOLERANCE_DEG = 1.0
NAME_SAMPLE = 16


def scene_fingerprint(scene: Scene) -> dict[str, Any]:
    """What identifies a scene's training split, independent of the image resolution.

    {root, n_train, names_sha256 (of the sorted train names), name_sample (up to 16 of them, spread
    over the sorted list), sample_c2w (their camera-to-world top 3x4 rows), centre_min /
    centre_max (bounding box of the train camera centres, dataset units)}.
    """
    idx = scene.split("train")
    order = sorted(idx, key=lambda i: scene.names[i])
    names = [scene.names[i] for i in order]
    c2w = np.asarray(scene.c2w, dtype=np.float64)
    centres = c2w[idx, :3, 3].reshape(-1, 3)
    sample = order[:: max(1, len(order) // NAME_SAMPLE)][:NAME_SAMPLE]
    return {
        "root": str(scene.root),
        "n_train": len(names),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "name_sample": [scene.names[i] for i in sample],
        "sample_c2w": [c2w[i, :3, :4].ravel().tolist() for i in sample],
        "centre_min": centres.min(0).tolist() if len(centres) else [0.0] * 3,
        "centre_max": centres.max(0).tolist() if len(centres) else [0.0] * 3,
    }


def _describe(fp: dict[str, Any]) -> str:
    lo = ", ".join(f"{v:.3g}" for v in fp["centre_min"])
    hi = ", ".join(f"{v:.3g}" for v in fp["centre_max"])
    return f"{fp['root']} ({fp['n_train']} train images, camera centres in [{lo}]..[{hi}])"


def check_scene(apr: APR, scene: Scene) -> None:
    """Raise FastnefesError when `apr` was clearly trained on another scene than `scene`.

    The APR stores 16 of its training images' names and poses. The scene must contain at least
    half of those names, and give them the same poses (within 1% of the training cameras'
    bounding-box diagonal and 1 degree). The same scene at another resolution passes (names and
    poses do not depend on it). An APR without a stored fingerprint is not checked.
    """
    fp = getattr(apr, "fingerprint", None)
    if not fp:
        return
    cur = scene_fingerprint(scene)
    index = scene.index_of()
    sample = [(n, np.asarray(p, dtype=np.float64).reshape(3, 4)) for n, p in zip(fp["name_sample"], fp["sample_c2w"])]
    shared = [(index[n], p) for n, p in sample if n in index]
    why = ""
    if fp.get("names_sha256") != cur["names_sha256"] and len(shared) < 0.5 * len(sample):
        why = "image names differ"
    elif shared:
        diag = float(np.linalg.norm(np.asarray(fp["centre_max"]) - np.asarray(fp["centre_min"])))
        mine = np.tile(np.eye(4), (len(shared), 1, 1))
        mine[:, :3, :4] = np.stack([p for _, p in shared])
        theirs = np.asarray(scene.c2w, dtype=np.float64)[[i for i, _ in shared]]
        t_err, r_err = pose_errors(mine, theirs)
        if t_err.max() > POSE_TOLERANCE * max(diag, 1e-9) or r_err.max() > ROT_TOLERANCE_DEG:
            why = f"poses of the same image names differ by up to {t_err.max():.3g} units / {r_err.max():.3g} deg"
    if why:
        src = getattr(apr, "source", None) or "the APR"
        raise FastnefesError(f"APR {src} was trained on another scene ({why}): {_describe(fp)} vs {_describe(cur)}")


def _finite_json(obj: Any) -> Any:
    """NaN / inf -> None so config.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def save_apr(apr: APR, out_dir: str | Path, scene: Optional[Scene] = None, metrics: Optional[dict] = None) -> Path:
    """Write `out_dir`/model.safetensors then `out_dir`/config.json (each atomically). Returns out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastnefesError(f"{out_dir}: exists and is not a folder (expected an APR output folder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in apr.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    fingerprint = scene_fingerprint(scene) if scene is not None else getattr(apr, "fingerprint", None)
    meta = {
        "format": FORMAT, "version": VERSION, "config": apr.config.to_dict(),
        "input_hw": list(apr.image_hw), "scene": fingerprint, "training": metrics or {},
        # how the training scene was loaded (as a field run records it): `apr predict` reuses it
        "data": dict(scene.load_options) if scene is not None else {},
    }
    write_json(out_dir / CONFIG_FILE, _finite_json(meta))
    apr.fingerprint = fingerprint
    apr.source = str(out_dir)
    apr.training_metrics = metrics or {}
    return out_dir


def load_apr(path: str | Path, device: str | torch.device = "cpu") -> APR:
    """Load an APR folder written by `save_apr` -> APR in eval mode on `device`.

    Raises FastnefesError (one line, naming the file) for a missing folder or file, a config of
    another format or version, or weights that are unreadable or do not fit the config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FastnefesError(f"{path}: APR folder not found (expected {CONFIG_FILE} + {WEIGHTS_FILE} from `fastnefes apr train`)")
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    meta = read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FastnefesError(f"{cfg_path}: not an APR config (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise FastnefesError(f"{cfg_path}: APR format version {meta.get('version')!r}, this fastnefes reads {VERSION}")
    try:
        config = APRConfig.from_dict(dict(meta["config"]), where=str(cfg_path))
        h, w = (int(v) for v in meta["input_hw"])
        apr = APR(config, (h, w))
    except (KeyError, TypeError, ValueError) as exc:
        raise FastnefesError(f"{cfg_path}: malformed APR config ({type(exc).__name__}: {exc})") from None
    if not w_path.is_file():
        raise FastnefesError(f"{w_path}: APR weights file not found")
    try:
        tensors = load_file(str(w_path), device="cpu")
    except Exception as exc:  # safetensors raises several types for truncated / garbage files
        raise FastnefesError(f"{w_path}: unreadable safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    expected = apr.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FastnefesError(f"{w_path}: weights do not fit {cfg_path} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        t = tensors[k]
        if t.shape != v.shape or t.dtype != v.dtype:
            raise FastnefesError(f"{w_path}: tensor {k} is {t.dtype} {list(t.shape)}, the config expects {v.dtype} {list(v.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FastnefesError(f"{w_path}: tensor {k} has non-finite values")
    apr.load_state_dict(tensors)
    apr.fingerprint = meta.get("scene")
    apr.source = str(path)
    apr.training_metrics = meta.get("training") or {}
    return apr.to(device).eval()
