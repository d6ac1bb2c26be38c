"""COLMAP sparse models (binary and text) and COLMAP-layout scenes.

Layout: `images/` beside `sparse/0/` (or `sparse/`, or a given model folder) holding
cameras / images / points3D as .bin or .txt. Images store world-to-camera qvec (w, x, y, z)
and tvec; pixel centres are at +0.5 as in fastnefes. Camera models PINHOLE, SIMPLE_PINHOLE,
SIMPLE_RADIAL, RADIAL, OPENCV and FULL_OPENCV load; images with distortion are undistorted
with OpenCV to the model's pinhole part. Scene names are image paths relative to the scene
root (`images/NAME`). Splits: a `list_test.txt` of COLMAP image names (hloc's convention) in
the model folder, its parent or the root, or `test_list=PATH`; else every 8th image in
name order is test. Val = test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fastnefes.data.formats import (
    LazyImages,
    check_resolution_options,
    every_nth_splits,
    export_points,
    fetch_image,
    fmt,
    image_size,
    loaded_size,
    make_splits,
    parse_floats,
    posix_name,
    require_dir,
    resize_intrinsics,
    staged_dir,
    train_and_heldout,
)
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import invert_pose, make_intrinsics, quat_to_rotmat, rotmat_to_quat
from fastnefes.io import atomic_path, read_text, write_image, write_text

# id -> (name, number of params); the ids are COLMAP's.
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
    4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
}
MODEL_IDS = {name: (mid, n) for mid, (name, n) in CAMERA_MODELS.items()}
# supported model -> indices of fx, fy, cx, cy in its params
PINHOLE_PARAMS = {
    "SIMPLE_PINHOLE": (0, 0, 1, 2), "PINHOLE": (0, 1, 2, 3), "SIMPLE_RADIAL": (0, 0, 1, 2),
    "RADIAL": (0, 0, 1, 2), "OPENCV": (0, 1, 2, 3), "FULL_OPENCV": (0, 1, 2, 3),
}


@dataclass
class ColmapCamera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray

    def pinhole_and_distortion(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        """K [3, 3] of the pinhole part and OpenCV distortion (k1, k2, p1, p2[, k3..k6]): the
        parameters after fx, fy, cx, cy are in OpenCV's order for every supported model."""
        if self.model not in PINHOLE_PARAMS:
            raise FastnefesError(f"{where}: camera {self.id} uses model {self.model}; supported: {', '.join(PINHOLE_PARAMS)}")
        idx = PINHOLE_PARAMS[self.model]
        extra = self.params[max(idx) + 1 :]
        dist = np.zeros(max(4, len(extra)))
        dist[: len(extra)] = extra
        return make_intrinsics(*self.params[list(idx)]), dist


@dataclass
class ColmapImage:
    id: int
    qvec: np.ndarray  # world-to-camera rotation (w, x, y, z)
    tvec: np.ndarray  # world-to-camera translation
    camera_id: int
    name: str
    xys: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point3d_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def c2w(self) -> np.ndarray:
        w2c = np.eye(4)
        w2c[:3, :3] = quat_to_rotmat(self.qvec)
        w2c[:3, 3] = self.tvec
        return invert_pose(w2c)


@dataclass
class ColmapPoints:
    ids: np.ndarray  # [M]
    xyz: np.ndarray  # [M, 3]
    rgb: np.ndarray  # [M, 3] uint8
    error: np.ndarray  # [M]
    tracks: list  # M arrays [L, 2] of (image id, point2D index)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Sequential little-endian reads from a binary model file; truncation is an error."""

    def __init__(self, path: Path):
        self.path, self.data, self.pos = path, path.read_bytes(), 0

    def read(self, fmt_: str):
        size = struct.calcsize("<" + fmt_)
        if self.pos + size > len(self.data):
            raise FastnefesError(f"{self.path}: truncated at byte {self.pos} (expected a complete COLMAP binary model)")
        out = struct.unpack_from("<" + fmt_, self.data, self.pos)
        self.pos += size
        return out

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise FastnefesError(f"{self.path}: truncated inside an image name")
        text = self.data[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return text


def _text_rows(path: Path):
    for lineno, line in enumerate(read_text(path, "a COLMAP text file").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield lineno, line.split()


def read_cameras(path: Path) -> dict[int, ColmapCamera]:
    cams = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            cid, mid, w, h = r.read("iiQQ")
            if mid not in CAMERA_MODELS:
                raise FastnefesError(f"{path}: camera {cid} has unknown model id {mid}")
            name, n = CAMERA_MODELS[mid]
            cams[cid] = ColmapCamera(cid, name, w, h, np.array(r.read("d" * n)))
    else:
        for lineno, f in _text_rows(path):
            where = f"{path}:{lineno}"
            if len(f) < 4 or f[1] not in MODEL_IDS:
                raise FastnefesError(f"{where}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[] with a known model, found {' '.join(f[:4])!r}")
            n = MODEL_IDS[f[1]][1]
            if len(f) != 4 + n:
                raise FastnefesError(f"{where}: model {f[1]} needs {n} parameters, found {len(f) - 4}")
            v = parse_floats(f[2:4], where, "WIDTH HEIGHT")
            cams[int(f[0])] = ColmapCamera(int(f[0]), f[1], int(v[0]), int(v[1]), parse_floats(f[4:], where, "camera parameters"))
    for cam in cams.values():
        if not np.all(np.isfinite(cam.params)):
            raise FastnefesError(f"{path}: camera {cam.id} has non-finite parameters")
    return cams


def _check_qvec(q: np.ndarray, where: str) -> None:
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > 1e-3:
        raise FastnefesError(f"{where}: quaternion norm {norm:.6f} is not 1 (tolerance 0.001)")


def read_images(path: Path) -> dict[int, ColmapImage]:
    images = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            iid, *pose, cid = r.read("idddddddi")
            name = r.string()
            (n,) = r.read("Q")
            flat = np.array(r.read("ddq" * n), dtype=np.float64).reshape(n, 3) if n else np.zeros((0, 3))
            v = np.array(pose)
            if not np.all(np.isfinite(v)):
                raise FastnefesError(f"{path}: image {name!r} has a non-finite pose")
            _check_qvec(v[:4], f"{path}: image {name!r}")
            images[iid] = ColmapImage(iid, v[:4], v[4:], cid, name, flat[:, :2], flat[:, 2].astype(np.int64))
        return images
    rows = read_text(path, "a COLMAP text file").splitlines()
    k = 0
    while k < len(rows):
        line = rows[k].strip()
        k += 1
        if not line or line.startswith("#"):
            continue
        f = line.split()
        where = f"{path}:{k}"
        if len(f) < 10:
            raise FastnefesError(f"{where}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, found {len(f)} fields")
        v = parse_floats(f[1:8], where, "QW QX QY QZ TX TY TZ")
        _check_qvec(v[:4], where)
        pts = rows[k].split() if k < len(rows) else []
        k += 1
        if len(pts) % 3:
            raise FastnefesError(f"{path}:{k}: POINTS2D line needs triples (X Y POINT3D_ID), found {len(pts)} values")
        flat = parse_floats(pts, f"{path}:{k}", "POINTS2D").reshape(-1, 3) if pts else np.zeros((0, 3))
        iid = int(f[0])
        images[iid] = ColmapImage(iid, v[:4], v[4:], int(f[8]), " ".join(f[9:]), flat[:, :2], flat[:, 2].astype(np.int64))
    return images


def read_points3d(path: Path) -> ColmapPoints:
    ids, xyz, rgb, err, tracks = [], [], [], [], []
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            pid, x, y, z, cr, cg, cb, e, n = r.read("QdddBBBdQ")
            ids.append(pid), xyz.append((x, y, z)), rgb.append((cr, cg, cb)), err.append(e)
            tracks.append(np.array(r.read("ii" * n), dtype=np.int64).reshape(n, 2))
    else:
        for lineno, f in _text_rows(path):
            if len(f) < 8 or (len(f) - 8) % 2:
                raise FastnefesError(f"{path}:{lineno}: expected POINT3D_ID X Y Z R G B ERROR TRACK[] (pairs), found {len(f)} fields")
            v = parse_floats(f[:8], f"{path}:{lineno}", "POINT3D_ID X Y Z R G B ERROR")
            ids.append(int(v[0])), xyz.append(v[1:4]), rgb.append(v[4:7]), err.append(v[7])
            tracks.append(np.array([int(t) for t in f[8:]], dtype=np.int64).reshape(-1, 2))
    xyz_arr = np.array(xyz, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(xyz_arr)):
        raise FastnefesError(f"{path}: non-finite point coordinates")
    return ColmapPoints(np.array(ids, np.int64), xyz_arr, np.array(rgb, np.uint8).reshape(-1, 3), np.array(err, np.float64), tracks)


def find_model_files(model_dir: Path) -> dict[str, Path]:
    """{'cameras', 'images', 'points3D'} -> files, all .bin or all .txt (binary preferred)."""
    for ext in (".bin", ".txt"):
        files = {k: model_dir / f"{k}{ext}" for k in ("cameras", "images", "points3D")}
        if files["cameras"].is_file():
            missing = [p for p in files.values() if not p.is_file()]
            if missing:
                raise FastnefesError(f"{missing[0]}: file not found (a COLMAP model needs cameras, images and points3D{ext})")
            return files
    raise FastnefesError(f"{model_dir}: no COLMAP model (expected cameras.bin/images.bin/points3D.bin or the .txt files)")


def read_model(model_dir) -> tuple[dict[int, ColmapCamera], dict[int, ColmapImage], ColmapPoints]:
    files = find_model_files(Path(model_dir))
    return read_cameras(files["cameras"]), read_images(files["images"]), read_points3d(files["points3D"])


# ----------------------------------------------------------------------------- writing


def _write_bytes(path: Path, chunks: list[bytes]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(chunks))


def write_model(model_dir, cameras: dict[int, ColmapCamera], images: dict[int, ColmapImage], points: ColmapPoints, binary: bool = True) -> None:
    """Write a COLMAP model (cameras, images, points3D) as .bin or .txt files."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if binary:
        out = [struct.pack("<Q", len(cameras))]
        for c in cameras.values():
            out.append(struct.pack("<iiQQ", c.id, MODEL_IDS[c.model][0], c.width, c.height) + struct.pack(f"<{len(c.params)}d", *c.params))
        _write_bytes(model_dir / "cameras.bin", out)
        out = [struct.pack("<Q", len(images))]
        for im in images.values():
            out.append(struct.pack("<idddddddi", im.id, *im.qvec, *im.tvec, im.camera_id) + im.name.encode() + b"\x00")
            out.append(struct.pack("<Q", len(im.xys)))
            out += [struct.pack("<ddq", x, y, int(p)) for (x, y), p in zip(im.xys, im.point3d_ids)]
        _write_bytes(model_dir / "images.bin", out)
        out = [struct.pack("<Q", len(points.ids))]
        for pid, p, c, e, t in zip(points.ids, points.xyz, points.rgb, points.error, points.tracks):
            out.append(struct.pack("<QdddBBBdQ", int(pid), *p, *(int(v) for v in c), e, len(t)) + struct.pack(f"<{2 * len(t)}i", *t.reshape(-1)))
        _write_bytes(model_dir / "points3D.bin", out)
        return
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]", f"# Number of cameras: {len(cameras)}"]
    lines += [f"{c.id} {c.model} {c.width} {c.height} " + " ".join(fmt(v) for v in c.params) for c in cameras.values()]
    write_text(model_dir / "cameras.txt", "\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)", f"# Number of images: {len(images)}"]
    for im in images.values():
        lines.append(f"{im.id} " + " ".join(fmt(v) for v in (*im.qvec, *im.tvec)) + f" {im.camera_id} {im.name}")
        lines.append(" ".join(f"{fmt(x)} {fmt(y)} {int(p)}" for (x, y), p in zip(im.xys, im.point3d_ids)))
    write_text(model_dir / "images.txt", "\n".join(lines) + "\n")
    lines = ["# 3D point list with one line of data per point:", "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)", f"# Number of points: {len(points.ids)}"]
    for pid, p, c, e, t in zip(points.ids, points.xyz, points.rgb, points.error, points.tracks):
        lines.append(f"{int(pid)} " + " ".join(fmt(v) for v in p) + " " + " ".join(str(int(v)) for v in c) + f" {fmt(e)} " + " ".join(str(int(v)) for v in t.reshape(-1)))
    write_text(model_dir / "points3D.txt", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- scenes


def is_colmap(root: Path) -> bool:
    root = Path(root)
    return any((root / d / f"cameras{ext}").is_file() for d in ("sparse/0", "sparse") for ext in (".bin", ".txt"))


def _find_model_dir(root: Path, model_dir) -> Path:
    if model_dir is not None:
        path = Path(model_dir) if Path(model_dir).is_absolute() else root / model_dir
        return require_dir(path, "a COLMAP model folder")
    for cand in (root / "sparse" / "0", root / "sparse", root):
        if any((cand / f"cameras{ext}").is_file() for ext in (".bin", ".txt")):
            return cand
    raise FastnefesError(f"{root}: no COLMAP model in sparse/0, sparse or the folder itself (expected cameras.bin or cameras.txt)")


def _read_test_list(path: Path, known: set[str]) -> set[str]:
    names = set()
    for lineno, line in enumerate(read_text(path, "a COLMAP text file").splitlines(), start=1):
        name = line.strip().removeprefix("./")
        if not name or name.startswith("#"):
            continue
        if name not in known:
            raise FastnefesError(f"{path}:{lineno}: {name!r} is not an image of the COLMAP model")
        names.add(name)
    return names


def load_colmap(
    root,
    *,
    downscale: float = 1,
    max_side: Optional[int] = None,
    focal: Optional[float] = None,
    model_dir=None,
    images_dir=None,
    test_list=None,
    points: bool = True,
) -> Scene:
    """Load a COLMAP scene (see the module docstring). `focal` overrides fx = fy."""
    check_resolution_options(downscale, max_side)
    root = require_dir(Path(root), "a COLMAP scene folder")
    mdir = _find_model_dir(root, model_dir)
    files = find_model_files(mdir)
    cameras, images = read_cameras(files["cameras"]), read_images(files["images"])
    image_root = require_dir(Path(images_dir) if images_dir is not None else root / "images", "the images folder beside sparse/")
    if not images:
        raise FastnefesError(f"{files['images']}: the model has no images")
    ordered = sorted(images.values(), key=lambda im: im.name)
    paths = [image_root / im.name for im in ordered]
    for im, p in zip(ordered, paths):
        if not p.is_file():
            raise FastnefesError(f"{p}: pose without image (image {im.id} {im.name!r} of {files['images']})")
        if im.camera_id not in cameras:
            raise FastnefesError(f"{files['images']}: image {im.name!r} uses camera {im.camera_id}, not in {files['cameras']}")
        cam, (h, w) = cameras[im.camera_id], image_size(p)
        if (h, w) != (cam.height, cam.width):
            raise FastnefesError(f"{p}: image is {w}x{h}, its COLMAP camera says {cam.width}x{cam.height}")
    stored_hw = np.array([(cameras[im.camera_id].height, cameras[im.camera_id].width) for im in ordered], dtype=np.int64)
    Kd = [cameras[im.camera_id].pinhole_and_distortion(str(files["cameras"])) for im in ordered]
    K_stored = np.stack([k for k, _ in Kd])
    if focal is not None:
        if not focal > 0:
            raise FastnefesError(f"focal must be positive, got {focal}")
        K_stored[:, 0, 0] = K_stored[:, 1, 1] = focal
    width = max(len(d) for _, d in Kd)
    dist = np.stack([np.pad(d, (0, width - len(d))) for _, d in Kd])
    loaded_hw = np.array([loaded_size(hw, downscale, max_side) for hw in stored_hw], dtype=np.int64)
    K = np.stack([resize_intrinsics(k, hw, lhw) for k, hw, lhw in zip(K_stored, stored_hw, loaded_hw)])

    colmap_names = [im.name for im in ordered]
    if test_list is None:
        found = [d / "list_test.txt" for d in (mdir, mdir.parent, root) if (d / "list_test.txt").is_file()]
        test_list = found[0] if found else None
    if test_list is not None:
        listed = _read_test_list(Path(test_list), set(colmap_names))
        test = [i for i, n in enumerate(colmap_names) if n in listed]
        splits = make_splits([i for i in range(len(ordered)) if colmap_names[i] not in listed], test, test)
    else:
        splits = every_nth_splits(len(ordered))
    return Scene(
        root=root,
        names=[posix_name(p, root) for p in paths],
        c2w=np.stack([im.c2w() for im in ordered]),
        K=K,
        hw=loaded_hw,
        splits=splits,
        image_fn=LazyImages(paths, stored_hw, loaded_hw, K_stored, dist),
        points=read_points3d(files["points3D"]).xyz if points else None,
        format="colmap",
    )


def write_colmap(scene: Scene, out_dir, *, binary: bool = True, overwrite: bool = False) -> list[str]:
    """Write `scene` as `images/` + `sparse/0/` (PINHOLE cameras, one per distinct intrinsics);
    returns the written names (`images/...`) in scene order. Points: the scene's points, else
    points back-projected from its depth maps (each observed in its source image). When the
    held-out images are not the every-8th rule's, list_test.txt names them."""
    colmap_names = [n.removeprefix("images/") for n in scene.names]
    if len(set(colmap_names)) != len(colmap_names):
        raise FastnefesError("scene image names are not unique; COLMAP needs unique names")
    order = sorted(range(len(scene)), key=lambda i: colmap_names[i])
    cameras: dict[int, ColmapCamera] = {}
    cam_of: dict[tuple, int] = {}
    images: dict[int, ColmapImage] = {}
    image_id = {}
    for rank, i in enumerate(order):
        K, (h, w) = scene.K[i], scene.hw[i]
        key = (K[0, 0], K[1, 1], K[0, 2], K[1, 2], int(h), int(w))
        if key not in cam_of:
            cam_of[key] = len(cam_of) + 1
            cameras[cam_of[key]] = ColmapCamera(cam_of[key], "PINHOLE", int(w), int(h), np.array(key[:4], dtype=np.float64))
        w2c = invert_pose(scene.c2w[i])
        image_id[i] = rank + 1
        images[rank + 1] = ColmapImage(rank + 1, rotmat_to_quat(w2c[:3, :3]), w2c[:3, 3], cam_of[key], colmap_names[i])
    points = _points_for(scene, images, image_id)
    _, heldout = train_and_heldout(scene)
    rule = {order[r] for r in range(len(order)) if r % 8 == 0}
    with staged_dir(out_dir, overwrite) as tmp:
        for i in range(len(scene)):
            write_image(tmp / "images" / colmap_names[i], fetch_image(scene, i))
        write_model(tmp / "sparse" / "0", cameras, images, points, binary=binary)
        if set(heldout) != rule:
            write_text(tmp / "list_test.txt", "".join(colmap_names[i] + "\n" for i in heldout))
    return ["images/" + n for n in colmap_names]


def _points_for(scene: Scene, images: dict[int, ColmapImage], image_id: dict[int, int]) -> ColmapPoints:
    """points3D from export_points; each back-projected point is observed in its source image."""
    exported = export_points(scene)
    empty = (np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.int64), np.zeros((0, 2)))
    xyz, rgb, src, pix = exported if exported is not None else empty
    ids = np.arange(1, len(xyz) + 1)
    tracks = [np.zeros((0, 2), np.int64)] * len(xyz)
    for i in np.unique(src[src >= 0]):
        sel = np.nonzero(src == i)[0]
        im = images[image_id[int(i)]]
        im.xys, im.point3d_ids = pix[sel], ids[sel]
        for k, p in enumerate(sel):
            tracks[p] = np.array([[im.id, k]], np.int64)
    return ColmapPoints(ids, xyz, rgb.astype(np.uint8), np.zeros(len(xyz)), tracks)
