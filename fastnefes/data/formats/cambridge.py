"""Cambridge Landmarks (PoseNet, Kendall et al. 2015).

Layout (as released):
    dataset_train.txt, dataset_test.txt    3 header lines, then `seqN/frameXXXXX.png X Y Z W P Q R`:
                                           camera centre (X Y Z) and the world-to-camera rotation
                                           as a quaternion (W P Q R = w x y z)
    seqN/frameXXXXX.png                    images
    reconstruction.nvm                     VisualSFM model (NVM_V3): per camera
                                           `name focal qw qx qy qz cx cy cz radial 0`, then points

The focal comes from reconstruction.nvm (camera names may be .jpg where the lists say .png:
they are matched by path without extension); an explicit `focal` (at the stored resolution)
overrides it, and an image with neither is an error. The principal point is the image centre
(the NVM radial term is not applied). NVM points become Scene.points when the NVM camera
centres agree with the lists (same frame), which is how the dataset was built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from fastnefes.data.formats import (
    LazyImages,
    check_resolution_options,
    export_points,
    fetch_image,
    fmt,
    image_size,
    loaded_size,
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
from fastnefes.geometry import invert_pose, make_intrinsics, quat_to_rotmat, rotmat_to_quat
from fastnefes.io import read_text, write_image, write_text

LIST_FILES = {"train": "dataset_train.txt", "test": "dataset_test.txt"}
LIST_HEADER = "Visual Landmark Dataset V1\nImageFile, Camera Position [X Y Z W P Q R]\n\n"
NVM_FILE = "reconstruction.nvm"
QUAT_NORM_TOL = 1e-3
_FRAME_NAME = re.compile(r"^seq(\d+)/frame(\d+)\.png$")


def is_cambridge(root: Path) -> bool:
    return any((Path(root) / f).is_file() for f in LIST_FILES.values())


def _stem_key(name: str) -> str:
    """Matching key for image names: POSIX path without './' and without extension."""
    name = name.replace("\\", "/").removeprefix("./")
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def _c2w_from_centre_quat(centre: np.ndarray, q_w2c: np.ndarray) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = quat_to_rotmat(q_w2c).T
    c2w[:3, 3] = centre
    return c2w


def _check_quat(q: np.ndarray, where: str) -> None:
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUAT_NORM_TOL:
        raise FastnefesError(f"{where}: quaternion norm {norm:.6f} is not 1 (tolerance {QUAT_NORM_TOL})")


def read_list(path: Path) -> list[tuple[str, np.ndarray, str]]:
    """(name, camera-to-world [4, 4], 'file:line') for each entry of a dataset_*.txt."""
    if not path.is_file():
        raise FastnefesError(f"{path}: file not found (Cambridge Landmarks needs dataset_train.txt and dataset_test.txt)")
    out = []
    for lineno, line in enumerate(read_text(path, "a Cambridge dataset list").splitlines()[3:], start=4):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 8:
            raise FastnefesError(f"{where}: expected 8 fields (IMAGE X Y Z W P Q R), found {len(fields)}")
        values = parse_floats(fields[1:], where, "X Y Z W P Q R")
        _check_quat(values[3:], where)
        out.append((fields[0].removeprefix("./"), _c2w_from_centre_quat(values[:3], values[3:]), where))
    return out


def read_nvm(path: Path, with_points: bool = True):
    """Cameras {key: (focal, camera-to-world [4, 4])} (key: name without extension) and points
    [M, 3] (or None) of the first model in an NVM_V3 file."""
    lines = read_text(path, "an NVM_V3 file").splitlines()
    if not lines or not lines[0].startswith("NVM_V3"):
        raise FastnefesError(f"{path}:1: expected an NVM_V3 header, found {lines[0][:40] if lines else ''!r}")
    if lines[0].startswith("NVM_V3_R9T"):
        raise FastnefesError(f"{path}:1: NVM_V3_R9T (rotation-matrix) files are not supported; expected NVM_V3")
    rows = [(k + 1, line.split()) for k, line in enumerate(lines[1:], start=1) if line.strip()]

    def count_at(pos: int, what: str) -> int:
        if pos >= len(rows):
            raise FastnefesError(f"{path}: file ends before the {what} count")
        lineno, fields = rows[pos]
        if len(fields) != 1 or not fields[0].isdigit():
            raise FastnefesError(f"{path}:{lineno}: expected the {what} count, found {' '.join(fields)!r}")
        return int(fields[0])

    n_cams = count_at(0, "camera")
    if len(rows) < 1 + n_cams:
        raise FastnefesError(f"{path}: file ends after {len(rows) - 1} of {n_cams} cameras")
    cameras = {}
    for lineno, fields in rows[1 : 1 + n_cams]:
        where = f"{path}:{lineno}"
        if len(fields) != 11:
            raise FastnefesError(f"{where}: expected 11 fields (name focal qw qx qy qz cx cy cz radial 0), found {len(fields)}")
        v = parse_floats(fields[1:10], where, "focal qw qx qy qz cx cy cz radial")
        _check_quat(v[1:5], where)
        if v[0] <= 0:
            raise FastnefesError(f"{where}: focal must be positive, found {v[0]}")
        cameras[_stem_key(fields[0])] = (float(v[0]), _c2w_from_centre_quat(v[5:8], v[1:5]))
    points = None
    if with_points and len(rows) > 1 + n_cams:
        n_pts = count_at(1 + n_cams, "point")
        pts = rows[2 + n_cams : 2 + n_cams + n_pts]
        if len(pts) < n_pts:
            raise FastnefesError(f"{path}: file ends after {len(pts)} of {n_pts} points")
        points = np.array([parse_floats(f[:3], f"{path}:{ln}", "point X Y Z") for ln, f in pts]).reshape(-1, 3)
    return cameras, points


def load_cambridge(
    root,
    *,
    downscale: float = 1,
    max_side: Optional[int] = None,
    focal: Optional[float] = None,
    nvm=None,
    points: bool = True,
) -> Scene:
    """Load a Cambridge Landmarks scene folder (see the module docstring)."""
    check_resolution_options(downscale, max_side)
    root = require_dir(Path(root), "a Cambridge Landmarks scene folder")
    entries = {split: read_list(root / fname) for split, fname in LIST_FILES.items()}
    names, c2w, where = [], [], []
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        for name, pose, loc in entries[split]:
            if name in seen:
                raise FastnefesError(f"{loc}: image {name!r} already listed at {seen[name]}")
            seen[name] = loc
            names.append(name)
            c2w.append(pose)
            where.append(loc)
    if not names:
        raise FastnefesError(f"{root}: dataset_train.txt and dataset_test.txt list no images")
    n_train = len(entries["train"])
    paths = [root / n for n in names]
    for p, loc in zip(paths, where):
        if not p.is_file():
            raise FastnefesError(f"{loc}: pose without image ({p} not found)")
    stored_hw = np.array([image_size(p) for p in paths], dtype=np.int64)
    c2w = np.stack(c2w)

    nvm_path = Path(nvm) if nvm is not None else root / NVM_FILE
    if nvm is not None and not nvm_path.is_file():
        raise FastnefesError(f"{nvm_path}: NVM file not found")
    nvm_cams, nvm_points = read_nvm(nvm_path, points) if nvm_path.is_file() else ({}, None)
    if focal is not None:
        if not focal > 0:
            raise FastnefesError(f"focal must be positive, got {focal}")
        focals = np.full(len(names), float(focal))
    else:
        missing = [n for n in names if _stem_key(n) not in nvm_cams]
        if missing:
            reason = f"not in {nvm_path}" if nvm_path.is_file() else f"{nvm_path} not found"
            raise FastnefesError(f"{root / missing[0]}: no focal length ({reason}; give --focal)")
        focals = np.array([nvm_cams[_stem_key(n)][0] for n in names])

    loaded_hw = np.array([loaded_size(hw, downscale, max_side) for hw in stored_hw], dtype=np.int64)
    K = np.stack(
        [resize_intrinsics(make_intrinsics(f, f, w / 2.0, h / 2.0), (h, w), lhw) for f, (h, w), lhw in zip(focals, stored_hw, loaded_hw)]
    )
    return Scene(
        root=root,
        names=names,
        c2w=c2w,
        K=K,
        hw=loaded_hw,
        splits=make_splits(range(n_train), [], range(n_train, len(names))),
        image_fn=LazyImages(paths, stored_hw, loaded_hw),
        points=nvm_points if _same_frame(names, c2w, nvm_cams) else None,
        format="cambridge",
    )


def _same_frame(names: list[str], c2w: np.ndarray, nvm_cams: dict) -> bool:
    """True when the NVM camera centres match the lists' (so NVM points are in the scene frame)."""
    pairs = [(c2w[i, :3, 3], nvm_cams[_stem_key(n)][1][:3, 3]) for i, n in enumerate(names) if _stem_key(n) in nvm_cams]
    if not pairs:
        return False
    a, b = (np.array(x) for x in zip(*pairs))
    extent = float(np.max(a.max(0) - a.min(0))) if len(a) > 1 else 1.0
    return float(np.median(np.linalg.norm(a - b, axis=1))) <= 1e-3 * max(extent, 1e-9)


def write_cambridge(scene: Scene, out_dir, *, sequence_length: int = 1000, overwrite: bool = False) -> list[str]:
    """Write `scene` as a Cambridge Landmarks folder; returns the written names in scene order.

    Names already in Cambridge form (`seqN/frameXXXXX.png`) are kept; otherwise train images fill
    seq1, seq2, ... (frames from 00001) in chunks of `sequence_length`, held-out ones the
    sequences after them. reconstruction.nvm holds each image's focal (fx; images need square
    pixels and a centred principal point) and the scene's points, or points back-projected from
    its depth maps.
    """
    K, hw = scene.K, scene.hw
    if not (np.allclose(K[:, 0, 0], K[:, 1, 1], rtol=1e-9) and np.allclose(K[:, 0, 2], hw[:, 1] / 2.0, atol=1e-9) and np.allclose(K[:, 1, 2], hw[:, 0] / 2.0, atol=1e-9)):
        raise FastnefesError("Cambridge Landmarks stores square pixels and a centred principal point; this scene's intrinsics differ")
    if all(_FRAME_NAME.match(n) for n in scene.names) and len(set(scene.names)) == len(scene.names):
        names = list(scene.names)
    else:
        names = sequence_names(scene, lambda s, f: f"seq{s}/frame{f + 1:05d}.png", sequence_length)
    train, heldout = train_and_heldout(scene)
    with staged_dir(out_dir, overwrite) as tmp:
        for i, name in enumerate(names):
            write_image(tmp / name, fetch_image(scene, i))
        for split, indices in (("train", train), ("test", heldout)):
            write_text(tmp / LIST_FILES[split], LIST_HEADER + "".join(_list_line(names[i], scene.c2w[i]) for i in indices))
        write_text(tmp / NVM_FILE, _format_nvm(scene, names))
    return names


def _list_line(name: str, c2w: np.ndarray) -> str:
    q = rotmat_to_quat(invert_pose(c2w)[:3, :3])
    return f"{name} " + " ".join(fmt(v) for v in (*c2w[:3, 3], *q)) + "\n"


def _format_nvm(scene: Scene, names: list[str]) -> str:
    lines = ["NVM_V3", "", str(len(names))]
    for i, name in enumerate(names):
        q = rotmat_to_quat(invert_pose(scene.c2w[i])[:3, :3])
        jpg = name.rsplit(".", 1)[0] + ".jpg"  # the released NVMs name the original JPEGs
        lines.append(f"{jpg} {fmt(scene.K[i, 0, 0])} " + " ".join(fmt(v) for v in (*q, *scene.c2w[i, :3, 3])) + " 0 0")
    exported = export_points(scene)
    if exported is None:
        lines += ["", "0", "", "0", ""]
        return "\n".join(lines)
    xyz, rgb, image, pix = exported
    lines += ["", str(len(xyz))]
    feature = np.zeros(len(names), np.int64)
    for p, c, i, uv in zip(xyz, rgb, image, pix):
        obs = "0"
        if i >= 0:
            x, y = uv[0] - scene.hw[i][1] / 2.0, uv[1] - scene.hw[i][0] / 2.0  # relative to the centre
            obs = f"1 {i} {feature[i]} {x:.3f} {y:.3f}"
            feature[i] += 1
        lines.append(" ".join(fmt(v) for v in p) + f" {c[0]} {c[1]} {c[2]} {obs}")
    lines += ["", "0", ""]
    return "\n".join(lines)
