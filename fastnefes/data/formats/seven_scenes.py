"""Microsoft 7-Scenes.

Layout (as released):
    TrainSplit.txt, TestSplit.txt          lines `sequence1`, `sequence2`, ... -> seq-01, seq-02
    seq-XX/frame-XXXXXX.color.png          RGB (.color.jpg as public copies often store it)
    seq-XX/frame-XXXXXX.pose.txt           4x4 camera-to-world (OpenCV axes), 4 text rows
    seq-XX/frame-XXXXXX.depth.png          optional, uint16 millimetres, 65535 = invalid

The dataset stores no intrinsics: the focal length is 585 px at 640x480 (scaled with the stored
image width), principal point at the image centre. A `focal` argument gives the focal at the
stored resolution instead; a scene written with a different focal must be read back with it.
The depth is not registered to the RGB camera in the real data; it is loaded as given.

Optional SfM pseudo ground truth (Brachmann et al. 2021, "On the limits of pseudo ground truth
in visual camera re-localisation"): `sfm_poses=PATH` (or a list of paths) with lines
`NAME qw qx qy qz tx ty tz f` (world-to-camera; f = focal at the stored resolution) replaces
the dSLAM poses and focal of every image; each image must then have exactly one entry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fastnefes.data.formats import (
    LazyDepths,
    LazyImages,
    check_resolution_options,
    check_rotation,
    depth_to_mm,
    fetch_image,
    loaded_size,
    image_size,
    make_splits,
    parse_floats,
    require_dir,
    resize_intrinsics,
    sequence_names,
    staged_dir,
    train_and_heldout,
)
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import make_intrinsics
from fastnefes.geometry.posefile import parse_pose_line
from fastnefes.io import read_text, write_image, write_text

SPLIT_FILES = {"train": "TrainSplit.txt", "test": "TestSplit.txt"}
DEFAULT_FOCAL = 585.0  # at 640 px width
DEFAULT_WIDTH = 640
DEPTH_INVALID = 65535
_SEQUENCE_LINE = re.compile(r"^sequence\s*(\d+)$", re.IGNORECASE)
_FRAME_NAME = re.compile(r"^seq-(\d+)/frame-(\d+)\.color\.png$")


def is_7scenes(root: Path) -> bool:
    return any((Path(root) / f).is_file() for f in SPLIT_FILES.values())


def read_split_file(path: Path) -> list[str]:
    """Sequence folder names (`seq-01`, ...) listed in a TrainSplit.txt / TestSplit.txt."""
    if not path.is_file():
        raise FastnefesError(f"{path}: split file not found (7-Scenes needs TrainSplit.txt and TestSplit.txt)")
    seqs = []
    for lineno, line in enumerate(read_text(path, "a 7-Scenes split file").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        match = _SEQUENCE_LINE.match(text)
        if match is None:
            raise FastnefesError(f"{path}:{lineno}: expected a line like 'sequence1', found {text!r}")
        seqs.append(f"seq-{int(match.group(1)):02d}")
    return seqs


def read_pose_txt(path: Path) -> np.ndarray:
    """A 7-Scenes .pose.txt: 4x4 camera-to-world, checked to be a rigid transform."""
    if not path.is_file():
        raise FastnefesError(f"{path}: pose file not found")
    rows = [line.split() for line in read_text(path, "a 4x4 pose").splitlines() if line.strip()]
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        counts = [len(r) for r in rows]
        raise FastnefesError(f"{path}: expected 4 rows of 4 numbers (4x4 camera-to-world), found rows of {counts}")
    values = [parse_floats(r, f"{path}:{k + 1}", "4x4 camera-to-world row") for k, r in enumerate(rows)]
    T = np.stack(values)
    check_rotation(T[:3, :3], str(path))
    if np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise FastnefesError(f"{path}: last row is {T[3].tolist()}, expected [0, 0, 0, 1]")
    return T


def read_sfm_poses(paths: Sequence[Path]) -> dict[str, tuple[np.ndarray, float]]:
    """{name: (camera-to-world [4, 4], focal)} from pseudo ground-truth lists."""
    out: dict[str, tuple[np.ndarray, float]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FastnefesError(f"{path}: SfM pose file not found")
        for lineno, line in enumerate(read_text(path, "an SfM pose list").splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            fields = text.split()
            if len(fields) != 9:
                raise FastnefesError(f"{where}: expected 9 fields (NAME qw qx qy qz tx ty tz f), found {len(fields)}")
            name, c2w = parse_pose_line(fields, where, extra_fields=1)
            (focal,) = parse_floats(fields[8:], where, "focal")
            if focal <= 0:
                raise FastnefesError(f"{where}: focal must be positive, found {focal}")
            name = name.removeprefix("./")
            if name in out:
                raise FastnefesError(f"{where}: duplicate image name {name!r}")
            out[name] = (c2w, float(focal))
    return out


COLOR_SUFFIXES = (".color.png", ".color.jpg", ".color.jpeg")  # public copies often re-encode as JPEG


def _sequence_frames(root: Path, seq: str, split_file: Path) -> list[str]:
    """The colour images of one sequence, `seq-XX/frame-XXXXXX.color.{png,jpg}`, sorted."""
    folder = root / seq
    if not folder.is_dir():
        hint = f" ({seq}.zip is there: unzip it)" if (root / f"{seq}.zip").is_file() else ""
        raise FastnefesError(f"{folder}: sequence folder listed in {split_file.name} not found{hint}")
    files = os.listdir(folder)
    colors: dict[str, str] = {}
    for f in files:
        suffix = next((s for s in COLOR_SUFFIXES if f.lower().endswith(s)), None)
        if suffix is None:
            continue
        stem = f[: -len(suffix)]
        if stem in colors:
            raise FastnefesError(f"{folder / f}: frame {stem} has two colour images ({colors[stem]} and {f}); keep one")
        colors[stem] = f
    poses = {f[: -len(".pose.txt")] for f in files if f.endswith(".pose.txt")}
    for stem in sorted(colors):
        if stem not in poses:
            raise FastnefesError(f"{folder / colors[stem]}: image without pose (expected {stem}.pose.txt)")
    extra = sorted(poses.difference(colors))
    if extra:
        raise FastnefesError(f"{folder / (extra[0] + '.pose.txt')}: pose without image (expected {extra[0]}.color.png or .color.jpg)")
    if not colors:
        raise FastnefesError(f"{folder}: no frame-XXXXXX.color.png (or .color.jpg) images found")
    return [f"{seq}/{colors[stem]}" for stem in sorted(colors)]


def _stem(name: str) -> str:
    """'seq-01/frame-000000.color.jpg' -> 'seq-01/frame-000000'."""
    return next(name[: -len(s)] for s in COLOR_SUFFIXES if name.lower().endswith(s))


def load_7scenes(
    root,
    *,
    downscale: float = 1,
    max_side: Optional[int] = None,
    focal: Optional[float] = None,
    sfm_poses=None,
) -> Scene:
    """Load a 7-Scenes scene folder (see the module docstring). Returns an OpenCV-axes Scene."""
    check_resolution_options(downscale, max_side)
    root = require_dir(Path(root), "a 7-Scenes scene folder")
    split_names: dict[str, list[str]] = {}
    for split, fname in SPLIT_FILES.items():
        split_file = root / fname
        frames = []
        for seq in read_split_file(split_file):
            frames += _sequence_frames(root, seq, split_file)
        split_names[split] = frames
    names = split_names["train"] + [s for s in split_names["test"] if s not in set(split_names["train"])]
    n_train = len(split_names["train"])
    stems = [_stem(n) for n in names]
    paths = [root / n for n in names]
    stored_hw = np.array([image_size(p) for p in paths], dtype=np.int64)

    if sfm_poses is not None:
        sfm = read_sfm_poses([sfm_poses] if isinstance(sfm_poses, (str, os.PathLike)) else list(sfm_poses))
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in sfm if n not in index]
        if unknown:
            raise FastnefesError(f"SfM poses list {unknown[0]!r} ({len(unknown)} such), which is not an image of the splits in {root}")
        missing = [n for n in names if n not in sfm]
        if missing:
            raise FastnefesError(f"{root / missing[0]}: no SfM pose for this image ({len(missing)} images without one)")
        c2w = np.stack([sfm[n][0] for n in names])
        focals = np.array([sfm[n][1] for n in names])
    else:
        c2w = np.stack([read_pose_txt(root / (s + ".pose.txt")) for s in stems])
        focals = DEFAULT_FOCAL * stored_hw[:, 1] / DEFAULT_WIDTH
    if focal is not None:  # an explicit focal (at the stored resolution) wins
        if not focal > 0:
            raise FastnefesError(f"focal must be positive, got {focal}")
        focals = np.full(len(names), float(focal))

    loaded_hw = np.array([loaded_size(hw, downscale, max_side) for hw in stored_hw], dtype=np.int64)
    K = np.stack(
        [
            resize_intrinsics(make_intrinsics(f, f, w / 2.0, h / 2.0), (h, w), lhw)
            for f, (h, w), lhw in zip(focals, stored_hw, loaded_hw)
        ]
    )
    depth_paths = [root / (s + ".depth.png") for s in stems]
    depth_fn = LazyDepths(depth_paths, loaded_hw, 1e-3, DEPTH_INVALID) if depth_paths[0].is_file() else None
    return Scene(
        root=root,
        names=names,
        c2w=c2w,
        K=K,
        hw=loaded_hw,
        splits=make_splits(range(n_train), [], range(n_train, len(names))),
        image_fn=LazyImages(paths, stored_hw, loaded_hw),
        depth_fn=depth_fn,
        format="7scenes",
    )


def _single_camera_focal(scene: Scene) -> float:
    """7-Scenes stores one pinhole camera: square pixels, centred principal point, one focal."""
    K, hw = scene.K, scene.hw
    f = K[0, 0, 0]
    ok = (
        np.allclose(K[:, 0, 0], f, rtol=1e-9)
        and np.allclose(K[:, 1, 1], f, rtol=1e-9)
        and np.allclose(K[:, 0, 2], hw[:, 1] / 2.0, atol=1e-9)
        and np.allclose(K[:, 1, 2], hw[:, 0] / 2.0, atol=1e-9)
        and np.all(hw == hw[0])
    )
    if not ok:
        raise FastnefesError("7-Scenes stores one pinhole camera (same size, fx = fy, centred principal point); this scene has several")
    return float(f)


def format_pose_txt(c2w: np.ndarray) -> str:
    return "".join("\t".join(f"{v:.17e}" for v in row) + "\t\n" for row in np.asarray(c2w, dtype=np.float64))


def write_7scenes(scene: Scene, out_dir, *, sequence_length: int = 1000, overwrite: bool = False) -> list[str]:
    """Write `scene` as a 7-Scenes folder; returns the written names in scene index order.

    Names already in 7-Scenes form (`seq-XX/frame-XXXXXX.color.png`, each sequence wholly train
    or wholly held out) are kept; otherwise train images fill seq-01, seq-02, ... in chunks of
    `sequence_length` and held-out (test/val) images the sequences after them. The focal is not
    stored (the format has no place for it): read back with `focal=` unless it equals
    585 * width / 640.
    """
    _single_camera_focal(scene)
    names = _keep_or_assign_names(scene, sequence_length)
    train, heldout = train_and_heldout(scene)
    seqs = {"train": sorted({names[i].split("/")[0] for i in train}), "test": sorted({names[i].split("/")[0] for i in heldout})}
    with staged_dir(out_dir, overwrite) as tmp:
        for i, name in enumerate(names):
            stem = tmp / name[: -len(".color.png")]
            stem.parent.mkdir(parents=True, exist_ok=True)
            write_image(tmp / name, fetch_image(scene, i))
            write_text(stem.with_name(stem.name + ".pose.txt"), format_pose_txt(scene.c2w[i]))
            if scene.depth_fn is not None:
                write_image(stem.with_name(stem.name + ".depth.png"), depth_to_mm(scene.depth(i), DEPTH_INVALID))
        for split, fname in SPLIT_FILES.items():
            lines = [f"sequence{int(s.removeprefix('seq-'))}" for s in seqs[split]]
            write_text(tmp / fname, "".join(line + "\n" for line in lines))
    return names


def _keep_or_assign_names(scene: Scene, sequence_length: int) -> list[str]:
    train, heldout = train_and_heldout(scene)
    matches = [_FRAME_NAME.match(n) for n in scene.names]
    if all(matches) and len(set(scene.names)) == len(scene.names):
        seq_of = [m.group(1) for m in matches]  # type: ignore[union-attr]
        if not {seq_of[i] for i in train} & {seq_of[i] for i in heldout}:
            return list(scene.names)
    return sequence_names(scene, lambda s, f: f"seq-{s:02d}/frame-{f:06d}.color.png", sequence_length)


__all__ = ["load_7scenes", "write_7scenes", "is_7scenes", "read_pose_txt", "read_sfm_poses", "format_pose_txt"]
