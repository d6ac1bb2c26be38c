"""transforms.json scenes: NeRF-synthetic (Blender), instant-ngp and nerfstudio.

Files: transforms_{train,val,test}.json (any of them; a missing val falls back to test and vice
versa) or a single transforms.json (nerfstudio `train_filenames` / `val_filenames` /
`test_filenames` if present, else every 8th frame in name order is test). Each frame has
`file_path` (with or without extension: .png, .jpg, .jpeg are tried) and `transform_matrix`
(OpenGL camera-to-world, 4x4 or 3x4; converted to OpenCV axes). Intrinsics: `fl_x` / `fl_y` /
`cx` / `cy` / `w` / `h` or `camera_angle_x` (/ `camera_angle_y`), per frame or global (frame
wins); cx, cy default to the image centre; OpenCV distortion `k1 k2 p1 p2 [k3]` is undone at
load. RGBA images are composited on white. Optional nerfstudio depth: `depth_file_path`
(16-bit PNG; value * depth_unit_scale, default 1e-3 = millimetres; 0 invalid).
Scene names: file paths relative to the root, with extension, POSIX, no leading './'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from fastnefes.data.formats import (
    LazyDepths,
    LazyImages,
    check_resolution_options,
    check_rotation,
    depth_to_mm,
    every_nth_splits,
    fetch_image,
    find_image_file,
    image_size,
    loaded_size,
    make_splits,
    posix_name,
    require_dir,
    resize_intrinsics,
    staged_dir,
    train_and_heldout,
)
from fastnefes.data.scene import SPLITS, Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import make_intrinsics, opencv_to_opengl, opengl_to_opencv
from fastnefes.io import read_json, write_image, write_json

SPLIT_FILE = "transforms_{}.json"
SINGLE_FILE = "transforms.json"
UNSUPPORTED_MODELS = ("OPENCV_FISHEYE", "EQUIRECTANGULAR", "FISHEYE")


def is_transforms(root: Path) -> bool:
    root = Path(root)
    if root.is_file():
        return root.suffix == ".json"
    return (root / SINGLE_FILE).is_file() or any((root / SPLIT_FILE.format(s)).is_file() for s in SPLITS)


def _frames(path: Path) -> tuple[dict, list[dict]]:
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise FastnefesError(f"{path}: expected a JSON object with a 'frames' list")
    for k, frame in enumerate(meta["frames"]):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise FastnefesError(f"{path}: frames[{k}] needs 'file_path' and 'transform_matrix'")
    return meta, meta["frames"]


def _pose(frame: dict, where: str) -> np.ndarray:
    try:
        m = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise FastnefesError(f"{where}.transform_matrix: expected a 4x4 (or 3x4) array of numbers") from None
    if m.shape not in ((4, 4), (3, 4)):
        raise FastnefesError(f"{where}.transform_matrix: expected a 4x4 (or 3x4) array, found shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise FastnefesError(f"{where}.transform_matrix: non-finite value")
    c2w = np.eye(4)
    c2w[:3] = m[:3]
    check_rotation(c2w[:3, :3], f"{where}.transform_matrix")
    return opengl_to_opencv(c2w)


def _number(key: str, frame: dict, meta: dict, where: str) -> Optional[float]:
    value = frame.get(key, meta.get(key))
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FastnefesError(f"{where}: '{key}' must be a finite number, found {value!r}")
    return float(value)


def _camera(frame: dict, meta: dict, hw: tuple[int, int], where: str, focal: Optional[float]):
    """Pinhole K [3, 3] and OpenCV distortion [5] at the stored size hw."""
    h, w = hw
    for key, size in (("w", w), ("h", h)):
        declared = _number(key, frame, meta, where)
        if declared is not None and int(round(declared)) != size:
            raise FastnefesError(f"{where}: '{key}' is {declared:g} but the image is {w}x{h}")
    model = frame.get("camera_model", meta.get("camera_model"))
    if model in UNSUPPORTED_MODELS:
        raise FastnefesError(f"{where}: camera_model {model} is not supported (expected a pinhole / OPENCV camera)")
    fx, fy = _number("fl_x", frame, meta, where), _number("fl_y", frame, meta, where)
    angle_x, angle_y = _number("camera_angle_x", frame, meta, where), _number("camera_angle_y", frame, meta, where)
    if fx is None and angle_x is not None:
        fx = 0.5 * w / math.tan(0.5 * angle_x)
    if fy is None and angle_y is not None:
        fy = 0.5 * h / math.tan(0.5 * angle_y)
    fx = fx if fx is not None else fy
    fy = fy if fy is not None else fx
    if focal is not None:
        fx = fy = float(focal)
    if fx is None or not (fx > 0 and fy > 0):
        raise FastnefesError(f"{where}: no valid focal length (expected fl_x/fl_y or camera_angle_x, or give --focal)")
    cx, cy = _number("cx", frame, meta, where), _number("cy", frame, meta, where)
    K = make_intrinsics(fx, fy, w / 2.0 if cx is None else cx, h / 2.0 if cy is None else cy)
    dist = np.array([_number(k, frame, meta, where) or 0.0 for k in ("k1", "k2", "p1", "p2", "k3")])
    return K, dist


def _resolve(root: Path, file_path: str, where: str) -> Path:
    if not isinstance(file_path, str) or not file_path:
        raise FastnefesError(f"{where}.file_path: expected a path string, found {file_path!r}")
    base = root / file_path
    found = find_image_file(base)
    if found is None:
        tried = "" if base.suffix else " (also tried .png, .jpg, .jpeg)"
        raise FastnefesError(f"{where}: image {base} not found{tried}")
    return found


def load_transforms(
    root,
    *,
    downscale: float = 1,
    max_side: Optional[int] = None,
    focal: Optional[float] = None,
    depth_unit_scale: float = 1e-3,
) -> Scene:
    """Load a transforms-json scene (see the module docstring). `root` may also be the json file."""
    check_resolution_options(downscale, max_side)
    root = Path(root)
    if root.is_file():
        files, root = {"all": root}, root.parent
    else:
        require_dir(root, "a folder with transforms.json or transforms_{train,val,test}.json")
        per_split = {s: root / SPLIT_FILE.format(s) for s in SPLITS if (root / SPLIT_FILE.format(s)).is_file()}
        if per_split:
            files = per_split
        elif (root / SINGLE_FILE).is_file():
            files = {"all": root / SINGLE_FILE}
        else:
            raise FastnefesError(f"{root}: no transforms.json or transforms_{{train,val,test}}.json")

    records: dict[str, dict] = {}  # name -> record, in first-seen order
    membership: dict[str, list[str]] = {s: [] for s in SPLITS}
    metas = {}
    for split, path in files.items():
        meta, frames = _frames(path)
        metas[split] = meta
        in_file = set()
        for k, frame in enumerate(frames):
            where = f"{path}: frames[{k}]"
            image_path = _resolve(root, frame["file_path"], where)
            name = posix_name(image_path, root)
            if name in in_file:
                raise FastnefesError(f"{where}: image {name!r} is listed twice")
            in_file.add(name)
            c2w = _pose(frame, where)
            if name in records:
                if np.abs(records[name]["c2w"] - c2w).max() > 1e-9:
                    raise FastnefesError(f"{where}: image {name!r} has a different pose in {records[name]['where']}")
            else:
                hw = image_size(image_path)
                K, dist = _camera(frame, meta, hw, where, focal)
                depth = frame.get("depth_file_path")
                records[name] = dict(path=image_path, c2w=c2w, hw=hw, K=K, dist=dist, where=where, depth=None if depth is None else _depth_path(root, depth, where))
            if split != "all":
                membership[split].append(name)

    if "all" in files:
        names = sorted(records)
        splits = _listed_splits(metas["all"], files["all"], root, names) or every_nth_splits(len(names))
    else:
        names = list(records)
        index = {n: i for i, n in enumerate(names)}
        splits = make_splits(*([index[n] for n in membership[s]] for s in SPLITS))
    recs = [records[n] for n in names]
    stored_hw = np.array([r["hw"] for r in recs], dtype=np.int64)
    loaded_hw = np.array([loaded_size(hw, downscale, max_side) for hw in stored_hw], dtype=np.int64)
    K_stored = np.stack([r["K"] for r in recs])
    dist = np.stack([r["dist"] for r in recs])
    has_depth = any(r["depth"] is not None for r in recs)
    return Scene(
        root=root,
        names=names,
        c2w=np.stack([r["c2w"] for r in recs]),
        K=np.stack([resize_intrinsics(k, hw, lhw) for k, hw, lhw in zip(K_stored, stored_hw, loaded_hw)]),
        hw=loaded_hw,
        splits=splits,
        image_fn=LazyImages([r["path"] for r in recs], stored_hw, loaded_hw, K_stored, dist if np.any(dist) else None),
        depth_fn=LazyDepths([r["depth"] for r in recs], loaded_hw, depth_unit_scale, None) if has_depth else None,
        format="transforms",
    )


def _depth_path(root: Path, depth: str, where: str) -> Path:
    if not isinstance(depth, str) or not depth:
        raise FastnefesError(f"{where}.depth_file_path: expected a path string, found {depth!r}")
    return root / depth


def _listed_splits(meta: dict, path: Path, root: Path, names: list[str]) -> Optional[dict[str, list[int]]]:
    """nerfstudio's train_filenames / val_filenames / test_filenames, or None if absent."""
    keys = {s: f"{s}_filenames" for s in SPLITS}
    if not any(k in meta for k in keys.values()):
        return None
    index = {n: i for i, n in enumerate(names)}
    stems = {n.rsplit(".", 1)[0]: i for n, i in index.items()}
    lists = {}
    for split, key in keys.items():
        entries = meta.get(key, [])
        if not isinstance(entries, list):
            raise FastnefesError(f"{path}: '{key}' must be a list of file names")
        idx = []
        for entry in entries:
            name = posix_name(root / str(entry), root)
            i = index.get(name, stems.get(name))
            if i is None:
                raise FastnefesError(f"{path}: '{key}' lists {entry!r}, which is not a frame's file_path")
            idx.append(i)
        lists[split] = idx
    return make_splits(lists["train"], lists["val"], lists["test"])


def write_transforms(scene: Scene, out_dir, *, single_file: bool = False, overwrite: bool = False) -> list[str]:
    """Write `scene` as a transforms-json folder; returns the written names in scene order.

    Default: NeRF-synthetic layout (`train/r_K.png`, transforms_{train,val,test}.json with
    file paths without extension; an image in val and test is listed in both). single_file:
    nerfstudio layout (`images/frame_KKKKK.png`, one transforms.json with *_filenames lists).
    Intrinsics: `camera_angle_x` when all images share one centred square-pixel camera, else
    fl_x/fl_y/cx/cy/w/h (global when shared, per frame otherwise). Depth (if any): nerfstudio
    `depth_file_path`, 16-bit millimetre PNGs under depth/.
    """
    train, heldout = train_and_heldout(scene)
    member = {s: scene.split(s) for s in SPLITS}
    member["train"] = train
    if not member["test"] and not member["val"]:
        member["test"] = heldout
    if single_file:
        names = [f"images/frame_{k + 1:05d}.png" for k in range(len(scene))]
        file_paths = list(names)
    else:
        names = [None] * len(scene)
        for split in SPLITS:
            for k, i in enumerate(member[split]):
                if names[i] is None:
                    names[i] = f"{split}/r_{k}.png"
        file_paths = ["./" + n[: -len(".png")] for n in names]
    shared = _shared_camera(scene)
    frames = []
    for i in range(len(scene)):
        frame = {"file_path": file_paths[i], "transform_matrix": opencv_to_opengl(scene.c2w[i]).tolist()}
        if shared is None:
            frame.update(_intrinsics_dict(scene.K[i], scene.hw[i]))
        if scene.depth_fn is not None:
            frame["depth_file_path"] = "depth/" + names[i]
        frames.append(frame)
    with staged_dir(out_dir, overwrite) as tmp:
        for i, name in enumerate(names):
            write_image(tmp / name, fetch_image(scene, i))
            if scene.depth_fn is not None:
                write_image(tmp / "depth" / name, depth_to_mm(scene.depth(i), 0))
        if single_file:
            meta = dict(shared or {}, frames=frames)
            for split in SPLITS:
                meta[f"{split}_filenames"] = [names[i] for i in member[split]]
            write_json(tmp / SINGLE_FILE, meta)
        else:
            for split in SPLITS:
                if member[split]:
                    write_json(tmp / SPLIT_FILE.format(split), dict(shared or {}, frames=[frames[i] for i in member[split]]))
    return names


def _intrinsics_dict(K: np.ndarray, hw) -> dict:
    return {"fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]), "w": int(hw[1]), "h": int(hw[0])}


def _shared_camera(scene: Scene) -> Optional[dict]:
    """Global intrinsics keys if every image has the same camera, else None."""
    if not (np.all(scene.K == scene.K[0]) and np.all(scene.hw == scene.hw[0])):
        return None
    K, (h, w) = scene.K[0], scene.hw[0]
    if K[0, 0] == K[1, 1] and K[0, 2] == w / 2.0 and K[1, 2] == h / 2.0:
        return {"camera_angle_x": 2.0 * math.atan(0.5 * w / K[0, 0])}
    return _intrinsics_dict(K, (h, w))
