"""Render the synthetic room into a Scene: RGB with per-frame exposure, exact z-depth, poses.

Colour is shaded in linear radiance (textured Lambertian surfaces lit by a point light with
hard shadows, a directional light and a hemispherical ambient term; all view-independent),
anti-aliased (footprint-filtered textures, s x s supersampling on edges), then passed through
a per-frame camera response (gain, white balance, gamma). Depth is the exact z-depth of the
ray through each pixel centre.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastnefes.data.scene import Scene
from fastnefes.data.synth.raycast import cast, shadowed, surface_frame
from fastnefes.data.synth.room import Room, make_room, surface_texture
from fastnefes.data.synth.trajectory import make_trajectories
from fastnefes.errors import FastnefesError

# 7-Scenes' Kinect colour camera: 585 px at 640 px width (horizontal FOV ~57.4 deg), so the
# 7-Scenes loader's default focal is exact for every synthetic image size.
FOCAL_AT_640 = 585.0
POINT_LIGHT_POWER = 2.0
SUN_POWER = 0.2
AMBIENT = 0.15
DISPLAY_GAMMA = 2.2


def synthetic_intrinsics(width: int, height: int) -> np.ndarray:
    """[3, 3] pinhole intrinsics: fx = fy = 585 * width / 640, centred principal point."""
    f = FOCAL_AT_640 * width / 640.0
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def camera_rays(K: np.ndarray, c2w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Origin [3, 1] and world directions [3, N] of the rays through image points x, y [N]
    (pixel (i, j) has its centre at (j + 0.5, i + 0.5)); directions have camera-z 1, so the
    ray parameter of a hit is its z-depth."""
    d_cam = np.stack([(x - K[0, 2]) / K[0, 0], (y - K[1, 2]) / K[1, 1], np.ones(len(x))])
    return c2w[:3, 3:4].copy(), c2w[:3, :3] @ d_cam


def shade(
    room: Room, o: np.ndarray, d: np.ndarray, t: np.ndarray, index: np.ndarray, pixel_angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Linear radiance [3, N] at the hits (t [N], primitive index [N]) of rays o [3, 1], d [3, N],
    and [N] bool: the point light is hidden by an object (shadow).

    pixel_angle: angular size of one (sub-)pixel in radians, to band-limit the textures.
    """
    # Work on the hits sorted by primitive, so each primitive's hits are one contiguous slice.
    order = np.argsort(index, kind="stable")
    prim_of = index[order]
    bounds = np.searchsorted(prim_of, np.arange(len(room.primitives) + 1))
    d, t = d[:, order], t[order]
    p = o + t * d
    ray_len = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    albedo = np.zeros(d.shape, dtype=np.float32)
    n = np.zeros(d.shape)
    for k, prim in enumerate(room.primitives):
        part = slice(bounds[k], bounds[k + 1])
        if part.start == part.stop:
            continue
        local, n_local, n[:, part] = surface_frame(prim, p[:, part])
        cos_view = np.abs(d[0, part] * n[0, part] + d[1, part] * n[1, part] + d[2, part] * n[2, part]) / ray_len[part]
        footprint = t[part] * ray_len[part] * pixel_angle / np.maximum(cos_view, 0.25)
        albedo[:, part] = surface_texture(prim.material, local, n_local, footprint)
    to_light = room.light_pos[:, None] - p
    dist2 = to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2
    n_dot_l = np.maximum(n[0] * to_light[0] + n[1] * to_light[1] + n[2] * to_light[2], 0.0) / np.sqrt(dist2)
    lit = np.nonzero(n_dot_l > 0)[0]
    blocked = shadowed(room, p[:, lit], prim_of[lit])
    n_dot_l[lit[blocked]] = 0.0
    point = POINT_LIGHT_POWER * n_dot_l / (1.0 + dist2 / 4.0)
    sun = SUN_POWER * np.maximum(room.sun_dir @ n, 0.0)
    ambient = AMBIENT + 0.3 * AMBIENT * n[2]  # more light from above than from below
    radiance = np.zeros(d.shape)
    radiance[:, order] = albedo**DISPLAY_GAMMA * (ambient + point + sun).astype(np.float32)
    in_shadow = np.zeros(d.shape[1], dtype=bool)
    in_shadow[order[lit[blocked]]] = True
    return radiance, in_shadow


def _edge_pixels(key: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose key differs from one of their 4 neighbours."""
    edge = np.zeros(key.shape, dtype=bool)
    dx = key[:, 1:] != key[:, :-1]
    dy = key[1:] != key[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    return edge


def render_view(
    room: Room, K: np.ndarray, c2w: np.ndarray, height: int, width: int, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Linear radiance [H, W, 3] (float64) and exact z-depth [H, W] (float64, metres, at pixel
    centres) of one OpenCV camera-to-world pose.

    Textures are band-limited to the pixel footprint, so one sample per pixel suffices inside
    surfaces; pixels on object or shadow boundaries are box-filtered over s x s sub-pixels.
    """
    s = supersample
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    jj, ii = jj.ravel(), ii.ravel()
    o, d = camera_rays(K, c2w, jj + 0.5, ii + 0.5)
    depth, index = cast(room, o, d)
    radiance, in_shadow = shade(room, o, d, depth, index, 1.0 / K[0, 0])
    if s > 1:
        edge = np.nonzero(_edge_pixels((2 * index + in_shadow).reshape(height, width)).ravel())[0]
        sub = (np.arange(s) + 0.5) / s
        sx, sy = np.meshgrid(sub, sub)
        x = (jj[edge, None] + sx.ravel()).ravel()
        y = (ii[edge, None] + sy.ravel()).ravel()
        o, d = camera_rays(K, c2w, x, y)
        t, sub_index = cast(room, o, d)
        sub_radiance, _ = shade(room, o, d, t, sub_index, 1.0 / (K[0, 0] * s))
        radiance[:, edge] = sub_radiance.reshape(3, len(edge), s * s).mean(axis=2)
    return radiance.T.reshape(height, width, 3), depth.reshape(height, width)


def frame_exposures(rng: np.random.Generator, n: int, strength: float) -> np.ndarray:
    """Per-frame camera response [n, 5]: gain, gamma, and RGB white-balance factors.

    Gain varies within +-strength, gamma within +-strength/2, white balance within +-strength/4.
    """
    gain = 1.0 + rng.uniform(-strength, strength, n)
    gamma = 1.0 + rng.uniform(-strength / 2, strength / 2, n)
    balance = 1.0 + rng.uniform(-strength / 4, strength / 4, (n, 3))
    return np.concatenate([gain[:, None], gamma[:, None], balance], axis=1)


def apply_exposure(radiance: np.ndarray, response: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] image of linear radiance [H, W, 3] under one frame's response [5]."""
    gain, gamma, balance = response[0], response[1], response[2:5]
    display = np.clip(radiance * (gain * balance), 0.0, 1.0) ** (gamma / DISPLAY_GAMMA)
    return np.round(display * 255.0).astype(np.uint8)


def synthetic_write_options(format: str, n_train: int, train_sequences: int = 2, test_sequence: int = 0) -> dict:
    """Options for `write_scene` that keep the generator's train sequences as the format's own
    sequences (7-Scenes seq-XX, Cambridge seqN); other formats need none.

    test_sequence: the number of consecutive test frames (a `test_fps` scene) that must stay one
    sequence. Those formats cut held-out frames into sequences of the train sequences' length, so
    a longer test sequence is refused rather than split.
    """
    if format in ("7scenes", "cambridge"):
        length = -(-n_train // train_sequences)
        if test_sequence > length:
            raise FastnefesError(f"a test sequence of {test_sequence} frames does not fit one {format} sequence, which holds "
                                 f"{length} frames here (the train sequences' length); use at most {length} test frames "
                                 f"or more train frames")
        return {"sequence_length": length}
    return {}


def make_synthetic_scene(
    seed: int = 0,
    width: int = 160,
    height: int = 120,
    n_train: int = 120,
    n_test: int = 30,
    train_sequences: int = 2,
    supersample: int = 2,
    exposure: float = 0.2,
    test_fps: float = 0.0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Scene:
    """Render the seeded synthetic room into an in-memory Scene.

    Names are `train-<k>/<frame:06d>.png` (k = 1..train_sequences) and `test-1/<frame:06d>.png`;
    writers rename them to their format's layout (see `synthetic_write_options`). No sparse
    points: writers that store them back-project the depth maps. Splits: train, and test
    (val = test). test_fps 0: the test views are spread over a whole loop through the room;
    test_fps > 0: they are consecutive frames of a hand-held walk at that frame rate (a few mm
    and a fraction of a degree apart at 30; see trajectory.LOOP_SECONDS). Poses are OpenCV
    camera-to-world in metres; depth is float32 z-depth in metres (no invalid pixels). `progress(done, total)` is called after each rendered frame. The same
    arguments always give the same bytes.
    """
    checks = (("seed", seed, 0), ("width", width, 8), ("height", height, 8), ("train", n_train, train_sequences),
              ("test", n_test, 1), ("supersample", supersample, 1), ("train_sequences", train_sequences, 1))
    for name, value, low in checks:
        if int(value) != value or value < low:
            raise FastnefesError(f"synthetic scene: {name}={value!r} is invalid (expected an integer >= {low})")
    if not 0.0 <= exposure < 1.0:
        raise FastnefesError(f"synthetic scene: exposure={exposure!r} is invalid (expected 0 <= exposure < 1)")
    if not (np.isfinite(test_fps) and test_fps >= 0):
        raise FastnefesError(f"synthetic scene: test_fps={test_fps!r} is invalid (expected frames per second > 0, or 0 for views round the room)")
    room = make_room(seed)
    sizes = [n_train // train_sequences + (k < n_train % train_sequences) for k in range(train_sequences)]
    train, test = make_trajectories(np.random.default_rng([seed, 2]), room, sizes, n_test, test_fps)
    c2w = np.concatenate(train + [test])
    names = [f"train-{k + 1}/{i:06d}.png" for k, seq in enumerate(train) for i in range(len(seq))]
    names += [f"test-1/{i:06d}.png" for i in range(n_test)]
    responses = frame_exposures(np.random.default_rng([seed, 3]), len(c2w), exposure)
    K = synthetic_intrinsics(width, height)
    images, depths = [], []
    for i, pose in enumerate(c2w):
        radiance, depth = render_view(room, K, pose, height, width, supersample)
        images.append(apply_exposure(radiance, responses[i]))
        depths.append(depth.astype(np.float32))
        if progress is not None:
            progress(i + 1, len(c2w))
    return Scene(
        root=Path(f"synthetic-seed{seed}"),
        names=names,
        c2w=c2w,
        K=np.tile(K, (len(c2w), 1, 1)),
        hw=np.tile(np.array([height, width]), (len(c2w), 1)),
        splits={"train": list(range(n_train)), "val": list(range(n_train, len(c2w))), "test": list(range(n_train, len(c2w)))},
        image_fn=images.__getitem__,
        depth_fn=depths.__getitem__,
        format="synthetic",
    )
