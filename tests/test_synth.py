"""The synthetic room: exact depth, textures, exposure, cameras, every format's round trip, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastnefes.data import load_scene, write_scene
from fastnefes.data.synth import (
    apply_exposure,
    make_room,
    make_synthetic_scene,
    render_view,
    synthetic_intrinsics,
    synthetic_write_options,
)
from fastnefes.data.synth.room import Box, Cylinder, Plane, Sphere
from fastnefes.data.synth.trajectory import make_trajectories
from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, height=48, n_train=12, n_test=4)


@pytest.fixture(scope="module")
def scene():
    return make_synthetic_scene(seed=0, **SMALL)


# ----------------------------------------------------------------------------- an independent reference


def signed_distance(room, p: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance [N] from points p [N, 3] in the room's free space to the nearest
    surface (negative inside a solid), written from the primitives' definitions."""
    out = []
    for prim in room.primitives:
        if isinstance(prim, Plane):  # free space is on the side the normal points to
            out.append((p[:, prim.axis] - prim.offset) * prim.sign)
        elif isinstance(prim, Sphere):
            out.append(np.linalg.norm(p - prim.centre, axis=1) - prim.radius)
        else:
            if isinstance(prim, Box):
                c, s = np.cos(prim.yaw), np.sin(prim.yaw)
                rel = p - prim.centre
                local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1)
                q = np.abs(local) - prim.half
            else:
                assert isinstance(prim, Cylinder)
                rho = np.hypot(p[:, 0] - prim.centre_xy[0], p[:, 1] - prim.centre_xy[1])
                q = np.stack([rho - prim.radius, np.abs(p[:, 2] - (prim.z0 + prim.z1) / 2) - (prim.z1 - prim.z0) / 2], 1)
            out.append(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0))
    return np.min(out, axis=0)


def sphere_trace(room, origin: np.ndarray, dirs: np.ndarray, iters: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Distance along unit rays [N, 3] from one origin to the first surface, by sphere tracing
    the exact distance field (no ray-primitive formula involved); and which rays converged."""
    t = np.zeros(len(dirs))
    done = np.zeros(len(dirs), dtype=bool)
    for _ in range(iters):
        active = np.nonzero(~done)[0]
        if not len(active):
            break
        d = signed_distance(room, origin + t[active, None] * dirs[active])
        assert (d > -1e-9).all(), "sphere tracing entered a solid"
        t[active] += d
        done[active[d < 1e-11]] = True
    return t, done


# ----------------------------------------------------------------------------- generator


def test_same_seed_same_bytes_other_seed_differs(scene):
    again = make_synthetic_scene(seed=0, **SMALL)
    other = make_synthetic_scene(seed=1, **SMALL)
    assert again.names == scene.names
    assert again.c2w.tobytes() == scene.c2w.tobytes()
    for i in range(len(scene)):
        assert again.image(i).tobytes() == scene.image(i).tobytes()
        assert again.depth(i).tobytes() == scene.depth(i).tobytes()
    assert np.abs(other.c2w - scene.c2w).max() > 0.1
    assert all(np.abs(other.image(i).astype(int) - scene.image(i)).mean() > 5 for i in range(len(scene)))


def test_depth_is_the_exact_first_surface(scene):
    """Depth at random pixels equals an independent sphere trace of the distance field, and the
    back-projected point lies on a surface."""
    rng = np.random.default_rng(7)
    room = make_room(0)
    h, w = scene.hw[0]
    checked = 0
    for i in range(len(scene)):
        ii, jj = rng.integers(0, h, 30), rng.integers(0, w, 30)
        K, c2w = scene.K[i], scene.c2w[i]
        ray_cam = np.stack([(jj + 0.5 - K[0, 2]) / K[0, 0], (ii + 0.5 - K[1, 2]) / K[1, 1], np.ones(30)], 1)
        depth = scene.depth(i)[ii, jj].astype(np.float64)
        points = c2w[:3, 3] + (ray_cam * depth[:, None]) @ c2w[:3, :3].T
        assert np.abs(signed_distance(room, points)).max() < 2e-6
        unit = ray_cam / np.linalg.norm(ray_cam, axis=1, keepdims=True)
        t, converged = sphere_trace(room, c2w[:3, 3], unit @ c2w[:3, :3].T)
        traced_depth = t * unit[:, 2]
        np.testing.assert_allclose(depth[converged], traced_depth[converged], rtol=5e-7, atol=2e-6)
        checked += converged.sum()
    assert checked > 0.95 * 30 * len(scene)


def test_images_are_textured_and_band_limited(scene):
    for i in range(len(scene)):
        img = scene.image(i).astype(np.float64)
        assert img.std() > 15
        assert np.abs(np.diff(img, axis=1)).mean() > 3  # fine detail, not flat shading
        assert len(np.unique(scene.image(i).reshape(-1, 3), axis=0)) > 500
        depth = scene.depth(i)
        assert depth.dtype == np.float32 and np.isfinite(depth).all() and depth.min() > 0.3
    # The small image matches a 4x4-supersampled rendering box-filtered down: textures are
    # low-passed for the pixel size rather than aliased (point-sampling the same textures
    # without the footprint filter is 8.6 / 9.5 grey levels off on these two views).
    room = make_room(0)
    neutral = np.ones(5)
    for i in (0, 9):
        small, _ = render_view(room, scene.K[i], scene.c2w[i], 48, 64)
        big, _ = render_view(room, synthetic_intrinsics(256, 192), scene.c2w[i], 192, 256)
        assert np.isfinite(small).all()
        reference = big.reshape(48, 4, 64, 4, 3).mean(axis=(1, 3))
        diff = apply_exposure(small, neutral).astype(float) - apply_exposure(reference, neutral)
        assert np.abs(diff).mean() < 6


def test_exposure_changes_per_frame_and_not_depth(scene):
    fixed = make_synthetic_scene(seed=0, exposure=0.0, **SMALL)
    np.testing.assert_array_equal(fixed.c2w, scene.c2w)
    room = make_room(0)
    log_gain = []
    for i in range(len(scene)):
        np.testing.assert_array_equal(fixed.depth(i), scene.depth(i))
        radiance, _ = render_view(room, fixed.K[i], fixed.c2w[i], 48, 64)
        np.testing.assert_array_equal(fixed.image(i), apply_exposure(radiance, np.ones(5)))
        a, b = scene.image(i).astype(float), fixed.image(i).astype(float)
        mid = (b > 40) & (b < 200) & (a > 0) & (a < 255)
        log_gain.append(np.median(np.log(a[mid] / b[mid])))
    assert np.std(log_gain) > 0.03
    assert np.abs(log_gain).max() < np.log(1.5)


def test_cameras_splits_and_intrinsics(scene):
    n_train, n = SMALL["n_train"], len(scene)
    assert scene.split("train") == list(range(n_train))
    assert scene.split("test") == scene.split("val") == list(range(n_train, n))
    assert len(set(scene.names)) == n
    K = scene.K[0]
    assert np.allclose(scene.K, K) and K[0, 0] == K[1, 1] == 585 * 64 / 640
    assert (K[0, 2], K[1, 2]) == (32.0, 24.0)
    assert 55 < np.degrees(2 * np.arctan(32 / K[0, 0])) < 66
    R = scene.c2w[:, :3, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    assert np.allclose(np.linalg.det(R), 1)

    room = make_room(0)
    train, test = make_trajectories(np.random.default_rng([0, 2]), room, [60, 60], 30)
    centres = np.concatenate(train + [test])[:, :3, 3]
    assert signed_distance(room, centres).min() >= 0.5
    assert 1.2 <= centres[:, 2].min() and centres[:, 2].max() <= 1.8
    train_centres = np.concatenate(train)[:, :3, 3]
    gaps = np.linalg.norm(test[:, None, :3, 3] - train_centres[None], axis=2).min(1)
    assert gaps.min() > 1e-3 and gaps.max() < 0.6  # a different path inside the train volume
    # the view directions vary: forward axes spread over all horizontal headings
    heading = np.arctan2(np.concatenate(train)[:, 1, 2], np.concatenate(train)[:, 0, 2])
    assert len(np.unique(np.floor((heading + np.pi) / (np.pi / 4)))) == 8


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["7scenes", "cambridge", "colmap", "transforms"])
def test_every_format_round_trips(scene, fmt, tmp_path):
    out = tmp_path / fmt
    written = write_scene(scene, out, fmt, **synthetic_write_options(fmt, SMALL["n_train"]))
    loaded = load_scene(out)
    assert loaded.format == fmt
    index = loaded.index_of()
    order = [index[name] for name in written]
    np.testing.assert_allclose(loaded.c2w[order], scene.c2w, atol=1e-6, rtol=0)
    np.testing.assert_allclose(loaded.K[order], scene.K, rtol=1e-9)
    assert {written[i] for i in scene.split("train")} == {loaded.names[i] for i in loaded.split("train")}
    assert {written[i] for i in scene.split("test")} == {loaded.names[i] for i in loaded.split("test")}
    for i, j in enumerate(order):
        np.testing.assert_array_equal(loaded.image(j), scene.image(i))
        depth = loaded.depth(j)
        if fmt == "7scenes":
            assert depth is not None
        if depth is not None:  # stored as millimetres
            np.testing.assert_allclose(depth, scene.depth(i), atol=0.5e-3 + 1e-6, rtol=0)
    if fmt == "7scenes":  # the two train sequences stay sequences
        assert sorted({n.split("/")[0] for n in written}) == ["seq-01", "seq-02", "seq-03"]


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastnefes", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_a_loadable_dataset_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    out = tmp_path / "room"
    size = ["--width", "32", "--height", "24", "--train", "6", "--test", "2", "--seed", "3"]
    done = run_cli("synth", str(out), "--format", "colmap", *size)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    loaded = load_scene(out)
    expected = make_synthetic_scene(seed=3, width=32, height=24, n_train=6, n_test=2)
    by_name = loaded.index_of()
    np.testing.assert_allclose(loaded.c2w[[by_name["images/" + n] for n in expected.names]], expected.c2w, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["room"]  # no staging folder left behind

    code, _, err = run_main(monkeypatch, capsys, "synth", str(out), "--format", "colmap", *size)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(out) in err and "--overwrite" in err

    code, _, err = run_main(monkeypatch, capsys, "synth", str(tmp_path / "other"), "--format", "ply")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'ply'" in err
    code, _, err = run_main(monkeypatch, capsys, "synth", str(tmp_path / "other"), "--format", "7scenes", "--width", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "width=4" in err
    assert not (tmp_path / "other").exists()

    code, _, err = run_main(monkeypatch, capsys, "synth", str(out), "--format", "transforms", "--overwrite", *size)
    assert code == 0, err
    assert load_scene(out).format == "transforms"
    assert [p.name for p in tmp_path.iterdir()] == ["room"]
