"""Scene formats: every writer + loader round trip, detection, downscaling, bad input, lego200."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from fastnefes.data import SPLITS, Scene, detect_format, load_scene, write_scene
from fastnefes.data.formats.colmap import ColmapCamera, ColmapImage, ColmapPoints, read_model, write_model
from fastnefes.errors import FastnefesError
from fastnefes.geometry import invert_pose, make_intrinsics, rotmat_to_quat, so3_exp

LEGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "lego200"
H, W, FOCAL = 24, 32, 30.0


def make_scene(n: int = 10, seed: int = 0, depth: bool = True) -> Scene:
    """Random textured images, random rigid poses, random depth (some invalid), 7 train / 3 test."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 4.0, (n, H, W)).astype(np.float32)
    depths[rng.random((n, H, W)) < 0.1] = 0.0
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = so3_exp(rng.normal(size=(n, 3)))
    c2w[:, :3, 3] = rng.uniform(-2.0, 2.0, (n, 3))
    test = [7, 8, 9][: max(0, n - 7)]
    return Scene(
        root=Path("."),
        names=[f"img_{i:02d}.png" for i in range(n)],
        c2w=c2w,
        K=np.tile(make_intrinsics(FOCAL, FOCAL, W / 2, H / 2), (n, 1, 1)),
        hw=np.tile([H, W], (n, 1)),
        splits={"train": [i for i in range(n) if i not in test], "val": test, "test": test},
        image_fn=lambda i: images[i],
        depth_fn=(lambda i: depths[i]) if depth else None,
        format="memory",
    )


def assert_same(scene: Scene, loaded: Scene, names: list[str], depth: bool) -> None:
    index = loaded.index_of()
    assert sorted(index) == sorted(names)
    for i, name in enumerate(names):
        j = index[name]
        np.testing.assert_allclose(loaded.c2w[j], scene.c2w[i], atol=1e-6, rtol=0)
        np.testing.assert_allclose(loaded.K[j], scene.K[i], rtol=1e-9, atol=1e-9)
        assert tuple(loaded.hw[j]) == tuple(scene.hw[i])
        np.testing.assert_array_equal(loaded.image(j), scene.image(i))
        if depth:
            d_in, d_out = scene.depth(i), loaded.depth(j)
            assert np.array_equal(d_out > 0, d_in > 0)
            assert np.abs(d_out - d_in).max() <= 0.0005 + 1e-6  # millimetre quantisation
    for split in SPLITS:
        assert {loaded.names[j] for j in loaded.split(split)} == {names[i] for i in scene.split(split)}, split


@pytest.mark.parametrize(
    "fmt, write_opts, load_opts, depth",
    [
        ("7scenes", {}, {"focal": FOCAL}, True),
        ("cambridge", {}, {}, False),
        ("colmap", {"binary": True}, {}, False),
        ("colmap", {"binary": False}, {}, False),
        ("transforms", {}, {}, True),
        ("transforms", {"single_file": True}, {}, True),
    ],
)
def test_roundtrip(tmp_path, fmt, write_opts, load_opts, depth):
    scene = make_scene()
    out = tmp_path / "scene"
    names = write_scene(scene, out, fmt, **write_opts)
    assert detect_format(out) == fmt
    for format_arg in (fmt, "auto"):
        loaded = load_scene(out, format=format_arg, **load_opts)
        assert loaded.format == fmt
        assert_same(scene, loaded, names, depth)
    assert not [p for p in tmp_path.iterdir() if p.name != "scene"]  # no staging leftovers


def test_7scenes_layout_default_focal_and_sfm_poses(tmp_path):
    scene = make_scene()
    names = write_scene(scene, tmp_path / "s", "7scenes", sequence_length=4)
    assert names[0] == "seq-01/frame-000000.color.png" and names[4] == "seq-02/frame-000000.color.png"
    assert (tmp_path / "s/TrainSplit.txt").read_text() == "sequence1\nsequence2\n"
    assert (tmp_path / "s/TestSplit.txt").read_text() == "sequence3\n"
    raw = cv2.imread(str(tmp_path / "s/seq-01/frame-000000.depth.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and set(np.unique(raw[scene.depth(0) == 0])) == {65535}
    assert np.abs(np.loadtxt(tmp_path / "s/seq-01/frame-000000.pose.txt") - scene.c2w[0]).max() < 1e-12
    default = load_scene(tmp_path / "s")
    assert default.K[0, 0, 0] == pytest.approx(585.0 * W / 640) and default.K[0, 0, 2] == W / 2

    # SfM pseudo ground truth replaces poses and focal
    rng = np.random.default_rng(1)
    other = scene.c2w.copy()
    other[:, :3, 3] += rng.normal(size=(len(scene), 3))
    lines = []
    for i, name in enumerate(names):
        w2c = invert_pose(other[i])
        q = rotmat_to_quat(w2c[:3, :3])
        lines.append(f"{name} " + " ".join(repr(float(v)) for v in (*q, *w2c[:3, 3])) + f" {28.5 + i}")
    pgt = tmp_path / "chess_all.txt"
    pgt.write_text("\n".join(lines) + "\n")
    sfm = load_scene(tmp_path / "s", sfm_poses=pgt)
    for i, name in enumerate(names):
        j = sfm.index_of()[name]
        assert np.abs(sfm.c2w[j] - other[i]).max() < 1e-6
        assert sfm.K[j, 0, 0] == pytest.approx(28.5 + i) and sfm.K[j, 1, 1] == pytest.approx(28.5 + i)
    pgt.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(FastnefesError, match="frame-000000.color.png: no SfM pose"):
        load_scene(tmp_path / "s", sfm_poses=pgt)
    pgt.write_text(lines[0].rsplit(" ", 1)[0] + "\n")
    with pytest.raises(FastnefesError, match=r"chess_all.txt:1: expected 9 fields"):
        load_scene(tmp_path / "s", sfm_poses=pgt)


def test_cambridge_layout_nvm_and_focal(tmp_path):
    scene = make_scene()
    names = write_scene(scene, tmp_path / "c", "cambridge")
    assert names[0] == "seq1/frame00001.png" and names[7] == "seq2/frame00001.png"
    lines = (tmp_path / "c/dataset_train.txt").read_text().splitlines()
    assert len(lines) == 3 + 7 and lines[3].split()[0] == "seq1/frame00001.png"
    x, y, z, *q = map(float, lines[3].split()[1:])
    np.testing.assert_allclose([x, y, z], scene.c2w[0, :3, 3], atol=1e-12)  # camera centre
    np.testing.assert_allclose(q, rotmat_to_quat(scene.c2w[0, :3, :3].T), atol=1e-12)  # world-to-camera
    nvm = (tmp_path / "c/reconstruction.nvm").read_text().splitlines()
    assert nvm[0] == "NVM_V3" and nvm[3].startswith("seq1/frame00001.jpg 30.0 ")
    loaded = load_scene(tmp_path / "c")
    assert loaded.points is not None and len(loaded.points) > 100  # back-projected depth, same frame
    (tmp_path / "c/reconstruction.nvm").unlink()
    with pytest.raises(FastnefesError, match=r"frame00001.png: no focal length \(.*reconstruction.nvm not found"):
        load_scene(tmp_path / "c")
    assert load_scene(tmp_path / "c", focal=31.0).K[0, 0, 0] == 31.0


def test_colmap_points_are_consistent_observations(tmp_path):
    scene = make_scene()
    write_scene(scene, tmp_path / "m", "colmap", binary=True)
    cameras, images, points = read_model(tmp_path / "m/sparse/0")
    assert len(points.ids) > 100 and all(c.model == "PINHOLE" for c in cameras.values())
    by_id = {im.id: im for im in images.values()}
    for pid, xyz, track in list(zip(points.ids, points.xyz, points.tracks))[::50]:
        im = by_id[int(track[0, 0])]
        cam = im.c2w()
        p_cam = invert_pose(cam)[:3, :3] @ xyz + invert_pose(cam)[:3, 3]
        K = cameras[im.camera_id].params
        uv = [K[0] * p_cam[0] / p_cam[2] + K[2], K[1] * p_cam[1] / p_cam[2] + K[3]]
        np.testing.assert_allclose(uv, im.xys[track[0, 1]], atol=1e-6)
        assert im.point3d_ids[track[0, 1]] == pid
    loaded = load_scene(tmp_path / "m")
    np.testing.assert_allclose(loaded.points, points.xyz)
    # a different test split is kept in list_test.txt (hloc's convention)
    scene.splits = {"train": [0, 1, 2, 3, 5, 6, 7, 9], "val": [4, 8], "test": [4, 8]}
    names = write_scene(scene, tmp_path / "m2", "colmap", binary=False)
    assert (tmp_path / "m2/list_test.txt").read_text() == "img_04.png\nimg_08.png\n"
    assert [load_scene(tmp_path / "m2").names[j] for j in load_scene(tmp_path / "m2").split("test")] == [names[4], names[8]]


def _opencv_distort(xn: np.ndarray, yn: np.ndarray, k1, k2, p1, p2):
    r2 = xn * xn + yn * yn
    radial = 1 + k1 * r2 + k2 * r2 * r2
    return xn * radial + 2 * p1 * xn * yn + p2 * (r2 + 2 * xn * xn), yn * radial + p1 * (r2 + 2 * yn * yn) + 2 * p2 * xn * yn


UNDISTORT_CASE = dict(h=48, w=64, f=50.0, cx=32.0, cy=24.0, dist=(-0.25, 0.05, 0.01, -0.005))


def _pattern(u, v):
    return 128 + 100 * np.sin(u / 5.0) * np.cos(v / 6.0)


def _distorted_image(h, w, f, cx, cy, dist) -> np.ndarray:
    """The pattern seen through an OpenCV-distorted camera: for each stored pixel, the
    undistorted point that the distortion model maps onto it (fixed-point inversion)."""
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float64)
    xd, yd = (jj + 0.5 - cx) / f, (ii + 0.5 - cy) / f
    xu, yu = xd.copy(), yd.copy()
    for _ in range(50):
        ex, ey = _opencv_distort(xu, yu, *dist)
        xu, yu = xu - (ex - xd), yu - (ey - yd)
    return np.repeat(_pattern(xu * f + cx, yu * f + cy)[..., None], 3, axis=2).round().astype(np.uint8)


def _check_undistorted(scene, distorted, h, w, **_):
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float64)
    expected = _pattern(jj + 0.5, ii + 0.5)
    inner = (slice(6, h - 6), slice(6, w - 6))
    err = np.abs(scene.image(0)[..., 0].astype(float) - expected)[inner]
    raw_err = np.abs(distorted[..., 0].astype(float) - expected)[inner]
    # 0.41 / 1.8 with the half-pixel convention handled; ignoring it gives 0.60 / 3.3
    assert err.mean() < 0.5 and err.max() < 2.5, (err.mean(), err.max())
    assert raw_err.mean() > 10 * err.mean()  # the distortion is strong enough to matter


@pytest.mark.parametrize("binary", [True, False])
def test_colmap_opencv_camera_is_undistorted(tmp_path, binary):
    c = UNDISTORT_CASE
    h, w, f, cx, cy, dist = c["h"], c["w"], c["f"], c["cx"], c["cy"], c["dist"]
    distorted = _distorted_image(**c)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images/a.png"), distorted)
    c2w = np.eye(4)
    c2w[:3, 3] = [1.0, 2.0, 3.0]
    write_model(
        tmp_path / "sparse/0",
        {1: ColmapCamera(1, "OPENCV", w, h, np.array([f, f, cx, cy, *dist]))},
        {7: ColmapImage(7, np.array([1.0, 0, 0, 0]), -c2w[:3, 3], 1, "a.png")},
        ColmapPoints(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), []),
        binary=binary,
    )
    scene = load_scene(tmp_path)
    assert scene.names == ["images/a.png"]
    np.testing.assert_allclose(scene.K[0], make_intrinsics(f, f, cx, cy))
    np.testing.assert_allclose(scene.c2w[0], c2w, atol=1e-12)
    _check_undistorted(scene, distorted, **c)


def test_instant_ngp_distortion_is_undistorted(tmp_path):
    """transforms.json as instant-ngp writes it: fl_x / fl_y / cx / cy and k1 k2 p1 p2 at the top."""
    c = UNDISTORT_CASE
    h, w, f, cx, cy, (k1, k2, p1, p2) = c["h"], c["w"], c["f"], c["cx"], c["cy"], c["dist"]
    distorted = _distorted_image(**c)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images/0001.jpg"), distorted, [cv2.IMWRITE_JPEG_QUALITY, 100])
    frames = [{"file_path": "./images/0001.jpg", "transform_matrix": np.eye(4).tolist()}]
    meta = {"fl_x": f, "fl_y": f, "cx": cx, "cy": cy, "w": w, "h": h, "k1": k1, "k2": k2, "p1": p1, "p2": p2,
            "aabb_scale": 4, "frames": frames}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(tmp_path)
    np.testing.assert_allclose(scene.K[0], make_intrinsics(f, f, cx, cy))
    decoded = cv2.imread(str(tmp_path / "images/0001.jpg"))[..., ::-1]
    _check_undistorted(scene, decoded, **c)


def test_downscale_and_max_side(tmp_path):
    scene = make_scene(depth=True)
    names = write_scene(scene, tmp_path / "t", "transforms")
    half = load_scene(tmp_path / "t", downscale=2)
    j = half.index_of()[names[3]]
    assert tuple(half.hw[j]) == (12, 16)
    np.testing.assert_allclose(half.K[j], make_intrinsics(15.0, 15.0, 8.0, 6.0))
    np.testing.assert_array_equal(half.image(j), cv2.resize(scene.image(3), (16, 12), interpolation=cv2.INTER_AREA))
    assert half.depth(j).shape == (12, 16)
    small = load_scene(tmp_path / "t", max_side=10)  # 32x24 -> 10x8 (longer side 10)
    assert tuple(small.hw[0]) == (8, 10) and small.image(0).shape == (8, 10, 3)
    np.testing.assert_allclose(small.K[0], make_intrinsics(FOCAL * 10 / 32, FOCAL * 8 / 24, 5.0, 4.0))
    for fmt in ("7scenes", "cambridge", "colmap"):
        write_scene(scene, tmp_path / fmt, fmt)
        s = load_scene(tmp_path / fmt, downscale=2, max_side=12, focal=FOCAL if fmt == "7scenes" else None)
        assert tuple(s.hw[0]) == (9, 12) and s.image(0).shape == (9, 12, 3), fmt
        np.testing.assert_allclose(s.K[0, 0, 0], FOCAL * 12 / 32)


def test_transforms_rgba_no_extension_and_fl_keys(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = 0
    rgba[5:10, 5:10, 3] = 255
    rgba[12, 12, 3] = 128
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs/x.png"), rgba[..., [2, 1, 0, 3]])
    cv2.imwrite(str(tmp_path / "imgs/y.jpeg"), np.full((H, W, 3), 90, np.uint8))
    gl = np.eye(4)
    gl[:3, 3] = [0.5, -1.0, 2.0]
    meta = {
        "fl_x": 40.0, "fl_y": 41.0, "cx": 15.0, "cy": 11.0, "w": W, "h": H,
        "frames": [
            {"file_path": "./imgs/x", "transform_matrix": gl.tolist()},
            {"file_path": "imgs/y", "transform_matrix": gl[:3].tolist(), "fl_x": 20.0},
        ],
    }
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(tmp_path)
    assert scene.names == ["imgs/x.png", "imgs/y.jpeg"]
    assert scene.split("test") == [0] and scene.split("train") == [1]  # every 8th in name order
    img = scene.image(0)
    assert tuple(img[0, 0]) == (255, 255, 255) and tuple(img[6, 6]) == (200, 100, 50)
    assert tuple(img[12, 12]) == tuple(round(c * 128 / 255 + 255 * 127 / 255) for c in (200, 100, 50))
    np.testing.assert_allclose(scene.K[0], make_intrinsics(40.0, 41.0, 15.0, 11.0))
    np.testing.assert_allclose(scene.K[1], make_intrinsics(20.0, 41.0, 15.0, 11.0))
    np.testing.assert_allclose(scene.c2w[0], np.diag([1.0, -1.0, -1.0, 1.0]) + np.pad(gl[:3, 3:], ((0, 1), (3, 0))))


# ----------------------------------------------------------------------------- bad input


def _write(tmp_path, fmt, **opts):
    out = tmp_path / fmt
    names = write_scene(make_scene(depth=fmt == "7scenes"), out, fmt, **opts)
    return out, names


def test_7scenes_bad_input(tmp_path):
    out, names = _write(tmp_path, "7scenes")
    pose = out / names[2].replace(".color.png", ".pose.txt")
    good = pose.read_text()
    T = np.loadtxt(pose)
    T[:3, :3] *= 1.01
    pose.write_text("\n".join(" ".join(repr(float(v)) for v in row) for row in T))
    with pytest.raises(FastnefesError, match=r"frame-000002.pose.txt: not a rotation matrix"):
        load_scene(out, focal=FOCAL)
    pose.write_text(good.replace(good.split()[5], "nan", 1))
    with pytest.raises(FastnefesError, match=r"frame-000002.pose.txt:2: non-finite"):
        load_scene(out, focal=FOCAL)
    pose.write_text("\n".join(good.splitlines()[:3]))
    with pytest.raises(FastnefesError, match=r"frame-000002.pose.txt: expected 4 rows of 4 numbers"):
        load_scene(out, focal=FOCAL)
    pose.unlink()
    with pytest.raises(FastnefesError, match=r"frame-000002.color.png: image without pose"):
        load_scene(out, focal=FOCAL)
    pose.write_text(good)
    (out / "seq-01/frame-000099.pose.txt").write_text(good)
    with pytest.raises(FastnefesError, match=r"frame-000099.pose.txt: pose without image"):
        load_scene(out, focal=FOCAL)
    (out / "seq-01/frame-000099.pose.txt").unlink()
    (out / "TestSplit.txt").write_text("sequence9\n")
    with pytest.raises(FastnefesError, match=r"seq-09: sequence folder listed in TestSplit.txt not found"):
        load_scene(out)
    (out / "TestSplit.txt").write_text("seq two\n")
    with pytest.raises(FastnefesError, match=r"TestSplit.txt:1: expected a line like 'sequence1'"):
        load_scene(out)
    (out / "TestSplit.txt").write_text("sequence2\n")
    image = out / names[1]
    image.write_bytes(image.read_bytes()[:200])  # truncated: found lazily, on first access
    scene = load_scene(out, focal=FOCAL)
    scene.image(0)
    with pytest.raises(FastnefesError, match=r"frame-000001.color.png: unreadable or truncated image"):
        scene.image(1)


def test_cambridge_bad_input(tmp_path):
    out, names = _write(tmp_path, "cambridge")
    listing = out / "dataset_train.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:4] + [" ".join(lines[4].split()[:7])] + lines[5:]) + "\n")
    with pytest.raises(FastnefesError, match=r"dataset_train.txt:5: expected 8 fields"):
        load_scene(out)
    listing.write_text("\n".join(lines[:4] + [lines[4].replace(lines[4].split()[2], "inf")] + lines[5:]) + "\n")
    with pytest.raises(FastnefesError, match=r"dataset_train.txt:5: non-finite"):
        load_scene(out)
    listing.write_text("\n".join(lines[:4] + [lines[4].replace(lines[4].split()[5], "3.0")] + lines[5:]) + "\n")
    with pytest.raises(FastnefesError, match=r"dataset_train.txt:5: quaternion norm"):
        load_scene(out)
    listing.write_text("\n".join(lines) + "\n")
    (out / names[3]).unlink()
    with pytest.raises(FastnefesError, match=r"dataset_train.txt:7: pose without image .*frame00004.png"):
        load_scene(out)


def test_colmap_bad_input(tmp_path):
    out, names = _write(tmp_path, "colmap", binary=True)
    images_bin = out / "sparse/0/images.bin"
    data = images_bin.read_bytes()
    images_bin.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastnefesError, match=r"images.bin: truncated"):
        load_scene(out)
    images_bin.write_bytes(data)
    (out / names[5]).unlink()
    with pytest.raises(FastnefesError, match=r"img_05.png: pose without image"):
        load_scene(out)
    text, _ = _write(tmp_path / "t", "colmap", binary=False)
    cams = text / "sparse/0/cameras.txt"
    cams.write_text(cams.read_text().replace("PINHOLE 32 24", "FOV 32 24").replace(" 12.0\n", " 12.0 0.1\n"))
    with pytest.raises(FastnefesError, match=r"cameras.txt: camera 1 uses model FOV; supported"):
        load_scene(text)
    imgs = text / "sparse/0/images.txt"
    rows = imgs.read_text().splitlines()
    rows[4] = rows[4].replace(rows[4].split()[5], "nan", 1)
    imgs.write_text("\n".join(rows) + "\n")
    with pytest.raises(FastnefesError, match=r"images.txt:5: non-finite"):
        load_scene(text)


def test_transforms_bad_input(tmp_path):
    out, names = _write(tmp_path, "transforms")
    path = out / "transforms_train.json"
    meta = json.loads(path.read_text())
    good = json.dumps(meta)
    meta["frames"][1]["transform_matrix"][0][0] = 2.0
    path.write_text(json.dumps(meta))
    with pytest.raises(FastnefesError, match=r"transforms_train.json: frames\[1\].transform_matrix: not a rotation"):
        load_scene(out)
    path.write_text(good)
    (out / "train/r_3.png").unlink()
    with pytest.raises(FastnefesError, match=r"transforms_train.json: frames\[3\]: image .*train/r_3 not found \(also tried"):
        load_scene(out)
    path.write_text("{not json")
    with pytest.raises(FastnefesError, match=r"transforms_train.json: not valid JSON"):
        load_scene(out)


def test_unknown_format_and_options(tmp_path):
    with pytest.raises(FastnefesError, match=r"unknown scene format \(expected 7scenes: TrainSplit.txt.*cambridge: dataset_train.txt"):
        detect_format(tmp_path)
    with pytest.raises(FastnefesError, match=r"missing: not found"):
        load_scene(tmp_path / "missing")
    with pytest.raises(FastnefesError, match=r"unknown format 'bogus'"):
        load_scene(tmp_path, format="bogus")
    with pytest.raises(FastnefesError, match=r"TrainSplit.txt: split file not found"):
        load_scene(tmp_path, format="7scenes")
    out, _ = _write(tmp_path, "colmap")
    with pytest.raises(FastnefesError, match=r"option 'nvm' does not apply to format colmap"):
        load_scene(out, nvm="x.nvm")
    with pytest.raises(FastnefesError, match=r"folder exists and is not empty"):
        write_scene(make_scene(), out, "colmap")
    replacement = make_scene(n=4, seed=5)
    write_scene(replacement, out, "colmap", overwrite=True)
    assert len(load_scene(out)) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["colmap"]
    with pytest.raises(FastnefesError, match=r"downscale must be a number >= 1"):
        load_scene(out, downscale=0.5)


# ----------------------------------------------------------------------------- lego200


@pytest.mark.skipif(not LEGO.is_dir(), reason=f"{LEGO} not present (NeRF-synthetic lego subset)")
def test_lego200_auto():
    scene = load_scene(LEGO)
    assert scene.format == "transforms" and len(scene) == 200
    val = scene.split("val")
    assert len(val) == 100 and scene.split("test") == val and len(scene.split("train")) == 100
    frames = json.loads((LEGO / "transforms_val.json").read_text())["frames"]
    index = scene.index_of()
    for frame in frames:
        i = index[frame["file_path"].removeprefix("./") + ".png"]
        assert i in val
        np.testing.assert_allclose(scene.c2w[i, :3, 3], np.array(frame["transform_matrix"])[:3, 3], atol=1e-6, rtol=0)
    meta = json.loads((LEGO / "transforms_val.json").read_text())
    assert scene.K[0, 0, 0] == pytest.approx(100.0 / math.tan(meta["camera_angle_x"] / 2))
    img = scene.image(val[0])
    assert img.shape == (200, 200, 3) and tuple(img[0, 0]) == (255, 255, 255)


def test_binary_model_layout_matches_colmap_spec(tmp_path):
    """cameras.bin bytes follow COLMAP's layout (independent struct decode)."""
    write_model(tmp_path, {3: ColmapCamera(3, "SIMPLE_RADIAL", 640, 480, np.array([500.0, 320.0, 240.0, 0.01]))}, {},
                ColmapPoints(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), []))
    data = (tmp_path / "cameras.bin").read_bytes()
    assert struct.unpack("<QiiQQ4d", data) == (1, 3, 2, 640, 480, 500.0, 320.0, 240.0, 0.01)
