"""Scene normalisation: content and cameras land in the unit cube, snugly, without tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnefes.data import Scene, SceneNormalization, compute_normalization, load_scene
from fastnefes.data.normalize import backproject_depth
from fastnefes.geometry import make_intrinsics, so3_exp

LEGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "lego200"
ROOM = np.array([[-2.0, -1.0, 0.0], [3.0, 1.5, 2.5]])


def ray_box(origins: np.ndarray, dirs: np.ndarray, box: np.ndarray):
    """Slab test: entry / exit ray parameters [M] (exit < entry: miss)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (box[0] - origins) / dirs
        t1 = (box[1] - origins) / dirs
    return np.nanmax(np.minimum(t0, t1), -1), np.nanmin(np.maximum(t0, t1), -1)


def pixel_rays(K, c2w, h, w):
    ii, jj = np.mgrid[0:h, 0:w]
    d_cam = np.stack([(jj + 0.5 - K[0, 2]) / K[0, 0], (ii + 0.5 - K[1, 2]) / K[1, 1], np.ones((h, w))], -1)
    return np.broadcast_to(c2w[:3, 3], (h, w, 3)), d_cam @ c2w[:3, :3].T  # camera-z = 1: t is z-depth


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    c2w[:3, 3] = eye
    return c2w


def room_scene(n=12, h=30, w=40, seed=0) -> Scene:
    """Cameras inside an empty box room looking in random directions; exact z-depth to the walls."""
    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = so3_exp(rng.normal(size=(n, 3)))
    c2w[:, :3, 3] = rng.uniform(ROOM[0] + 0.4, ROOM[1] - 0.4, (n, 3))
    K = make_intrinsics(35.0, 35.0, w / 2, h / 2)
    depths = []
    for T in c2w:
        o, d = pixel_rays(K, T, h, w)
        depths.append(ray_box(o.reshape(-1, 3), d.reshape(-1, 3), ROOM)[1].reshape(h, w).astype(np.float32))
    return Scene(
        root=Path("."), names=[f"{i}.png" for i in range(n)], c2w=c2w, K=np.tile(K, (n, 1, 1)),
        hw=np.tile([h, w], (n, 1)), splits={"train": list(range(n)), "val": [], "test": []},
        image_fn=lambda i: np.zeros((h, w, 3), np.uint8), depth_fn=lambda i: depths[i],
    )


def test_depth_scene_fits_unit_cube_snugly():
    scene = room_scene()
    norm = compute_normalization(scene, margin=0.05)
    assert norm.source == "depth"
    pts = np.concatenate([backproject_depth(scene.depth(i), scene.K[i], scene.c2w[i])[0] for i in range(len(scene))])
    for x in (pts, scene.c2w[:, :3, 3]):
        u = norm.to_unit(x)
        assert u.min() >= 0.0 and u.max() <= 1.0
    room_unit = norm.to_unit(ROOM)
    assert np.max(room_unit[1] - room_unit[0]) == pytest.approx(0.9, abs=0.02)  # longest side -> [0.05, 0.95]
    np.testing.assert_allclose(norm.from_unit(room_unit), ROOM, atol=1e-12)
    min_depth = min(scene.depth(i).min() for i in range(len(scene)))
    max_dist = max(
        np.linalg.norm(backproject_depth(scene.depth(i), scene.K[i], scene.c2w[i])[0] - scene.c2w[i, :3, 3], axis=1).max()
        for i in range(len(scene))
    )
    assert 0 < norm.near <= min_depth and norm.far >= max_dist


def test_depth_outliers_do_not_inflate_the_cube():
    scene = room_scene()
    clean = compute_normalization(scene)
    spiked = [scene.depth(i).copy() for i in range(len(scene))]
    for d in spiked[:3]:
        d[0, :3] = 500.0  # a few wild depth readings
    scene.depth_fn = lambda i: spiked[i]
    robust = compute_normalization(scene)
    assert robust.scale == pytest.approx(clean.scale, rel=0.02)


def test_sparse_points_with_outliers():
    scene = room_scene()
    rng = np.random.default_rng(3)
    inliers = rng.uniform(ROOM[0], ROOM[1], (2000, 3))
    outliers = rng.normal(size=(10, 3)) * 1000.0
    scene.depth_fn = None
    scene.points = np.concatenate([inliers, outliers])
    norm = compute_normalization(scene)
    assert norm.source == "points"
    u = norm.to_unit(np.concatenate([inliers, scene.c2w[:, :3, 3]]))
    assert u.min() >= -0.01 and u.max() <= 1.01  # 1-99 percentiles, then the margin
    assert 1.0 / norm.scale < 1.2 * np.max(ROOM[1] - ROOM[0])


OBJECT = np.array([[-0.6, -0.4, -0.3], [0.6, 0.9, 0.5]])


def object_scene(silhouettes: bool, n=24, size=40, seed=0) -> Scene:
    """Cameras on the upper hemisphere (radius 4) looking at the origin, an object box rendered
    on white (silhouettes) or on a textured background that fills every pixel."""
    rng = np.random.default_rng(seed)
    az = rng.uniform(0, 2 * np.pi, n)
    el = rng.uniform(0.05, 1.3, n)
    eyes = 4.0 * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    c2w = np.stack([look_at(e, np.zeros(3)) for e in eyes])
    K = make_intrinsics(55.0, 55.0, size / 2, size / 2)
    images = []
    for T in c2w:
        o, d = pixel_rays(K, T, size, size)
        t0, t1 = ray_box(o.reshape(-1, 3), d.reshape(-1, 3), OBJECT)
        hit = (t1 >= np.maximum(t0, 0)).reshape(size, size)
        bg = np.full((size, size, 3), 255, np.uint8) if silhouettes else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        bg[hit] = [200, 40, 40]
        images.append(bg)
    return Scene(
        root=Path("."), names=[f"{i}.png" for i in range(n)], c2w=c2w, K=np.tile(K, (n, 1, 1)),
        hw=np.tile([size, size], (n, 1)), splits={"train": list(range(n)), "val": [], "test": []},
        image_fn=lambda i: images[i],
    )


@pytest.mark.parametrize("silhouettes", [True, False])
def test_object_centric_scene(silhouettes):
    scene = object_scene(silhouettes)
    norm = compute_normalization(scene)
    assert norm.source == ("silhouettes" if silhouettes else "frusta")
    corners = np.array([[a, b, c] for a in OBJECT[:, 0] for b in OBJECT[:, 1] for c in OBJECT[:, 2]])
    u = norm.to_unit(corners)
    assert u.min() >= 0.0 and u.max() <= 1.0
    extent = np.max(u.max(0) - u.min(0))
    if silhouettes:
        assert extent > 0.65  # snug: the visual hull from 24 views above the horizon is a bit larger
    else:
        assert extent > 0.3  # the frusta intersection is looser but still far inside the camera sphere
    assert norm.near < 4.0 - np.linalg.norm(OBJECT, axis=1).max() and norm.far > 4.0


def test_serialisation_and_torch():
    norm = SceneNormalization(np.array([1.0, -2.0, 0.5]), 0.25, 0.1, 9.0, "depth")
    back = SceneNormalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back.to_dict() == norm.to_dict()
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 2.0, 0.5]], dtype=torch.float64)
    u = norm.to_unit(x)
    assert isinstance(u, torch.Tensor)
    torch.testing.assert_close(u, torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(norm.from_unit(u), x)
    lo, hi = norm.world_bounds
    np.testing.assert_allclose(norm.to_unit(np.stack([lo, hi])), [[0, 0, 0], [1, 1, 1]])


@pytest.mark.skipif(not LEGO.is_dir(), reason=f"{LEGO} not present (NeRF-synthetic lego subset)")
def test_lego200_fits_and_is_snug():
    scene = load_scene(LEGO)
    norm = compute_normalization(scene)
    assert norm.source == "silhouettes"
    assert 1.0 / norm.scale < 3.0  # cube side in world units: tighter than the usual [-1.5, 1.5]^3
    lo, hi = norm.world_bounds
    for i in scene.split("val")[::10]:  # held-out views: every object pixel's ray crosses the cube
        img = scene.image(i)
        fg = np.abs(img.astype(int) - 255).max(-1) > 3
        o, d = pixel_rays(scene.K[i], scene.c2w[i], *img.shape[:2])
        t0, t1 = ray_box(o[fg], d[fg], np.stack([lo, hi]))
        assert np.all(t1 >= np.maximum(t0, 0)), i
        assert norm.near <= t0.min() * np.linalg.norm(d[fg], axis=-1).min()
