"""Smooth hand-held-like camera paths through the synthetic room.

A path is a loop around the room's centre (an ellipse with a little harmonic wobble), with a
slowly varying height, and a view direction given by yaw (relative to the outward radial
direction), pitch and roll that oscillate smoothly. Train sequences run on outer and inner
loops looking outward and inward; the test path runs between them with other phases, so it
stays inside the volume (and the view directions) the train cameras cover.

A test *sequence* (`test_fps` > 0) walks the same test loop at a hand-held pace instead: the
loop takes LOOP_SECONDS, and consecutive frames are 1 / test_fps seconds apart. At 30 frames per
second the camera moves about 3.5 mm and turns about 0.6 degrees between frames (the room, seed 0:
at most 4.3 mm and 1.1 degrees), like a 7-Scenes recording.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastnefes.data.synth.room import LOW_OBJECT_TOP, Room, clearance

MIN_CLEARANCE = 0.5  # metres from any wall or object
HEIGHT_RANGE = (LOW_OBJECT_TOP + 0.55, 1.75)
LOOP_SECONDS = 60.0  # duration of one loop of a test sequence (about 0.1 m/s, 17 deg/s on average)


@dataclass
class LoopPath:
    """Parameters of one loop (angles in radians, lengths in metres)."""

    centre: np.ndarray  # [2] xy
    radii: np.ndarray  # [2] ellipse semi-axes along x, y
    start: float  # polar angle of the first frame
    turns: float  # signed number of loops over the sequence
    wobble: float  # relative radius modulation of the 3rd harmonic
    height: float
    height_amp: float
    yaw_offset: float  # 0 looks outward (at the walls), pi inward (across the room)
    yaw_amp: float
    pitch: float
    pitch_amp: float
    roll_amp: float
    phases: np.ndarray  # [5] phases of wobble, height, yaw, pitch, roll


def look_rotation(forward: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world rotations [N, 3, 3] (x right, y down, z forward) for unit
    forward vectors [N, 3] in a z-up world, rolled by `roll` [N] radians about forward."""
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(forward, right)
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    right, down = c * right + s * down, c * down - s * right
    return np.stack([right, down, forward], axis=2)


def path_poses(path: LoopPath, n: int) -> np.ndarray:
    """Camera-to-world poses [n, 4, 4] (OpenCV axes) of n frames evenly spaced along the path."""
    return path_poses_at(path, np.arange(n) / max(n, 1))


def path_poses_at(path: LoopPath, s: np.ndarray) -> np.ndarray:
    """Camera-to-world poses [n, 4, 4] (OpenCV axes) at the loop fractions s [n] (0 = the first
    frame, 1 = once round; every term is periodic in s, so s > 1 goes round again)."""
    n = len(s)
    ph = path.phases
    theta = path.start + 2 * np.pi * path.turns * s
    radius = 1.0 + path.wobble * np.sin(3 * theta + ph[0])
    xy = path.centre + path.radii * radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    z = path.height + path.height_amp * np.sin(2 * np.pi * 2 * s + ph[1])
    outward = np.arctan2(xy[:, 1] - path.centre[1], xy[:, 0] - path.centre[0])
    yaw = outward + path.yaw_offset + path.yaw_amp * np.sin(2 * np.pi * 3 * s + ph[2])
    pitch = path.pitch + path.pitch_amp * np.sin(2 * np.pi * 4 * s + ph[3])
    roll = path.roll_amp * np.sin(2 * np.pi * 5 * s + ph[4])
    forward = np.stack([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)], 1)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = look_rotation(forward, roll)
    c2w[:, :3, 3] = np.concatenate([xy, z[:, None]], 1)
    return c2w


def random_path(rng: np.random.Generator, room: Room, radius_scale: float, yaw_offset: float) -> LoopPath:
    """A loop whose size is `radius_scale` (0..1) of the largest one keeping 0.95 m from the walls."""
    centre = room.size[:2] / 2 + rng.uniform(-0.1, 0.1, 2)
    wobble = rng.uniform(0.03, 0.08)
    largest = (room.size[:2] / 2 - 0.1 - 0.95) / (1 + wobble)
    lo, hi = HEIGHT_RANGE
    height_amp = rng.uniform(0.1, (hi - lo) / 2)
    return LoopPath(
        centre=centre,
        radii=largest * radius_scale,
        start=rng.uniform(0, 2 * np.pi),
        turns=float(rng.choice([-1.0, 1.0])),
        wobble=wobble,
        height=rng.uniform(lo + height_amp, hi - height_amp),
        height_amp=height_amp,
        yaw_offset=yaw_offset,
        yaw_amp=rng.uniform(0.5, 0.9),
        pitch=rng.uniform(-0.45, -0.25),
        pitch_amp=rng.uniform(0.1, 0.2),
        roll_amp=rng.uniform(0.02, 0.08),
        phases=rng.uniform(0, 2 * np.pi, 5),
    )


def make_trajectories(rng: np.random.Generator, room: Room, train_sizes: list[int], n_test: int,
                      test_fps: float = 0.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Train sequences (one [n_k, 4, 4] array per entry of train_sizes) and a test path [n_test, 4, 4].

    Train loops alternate between looking outward (at the nearer walls, on smaller loops) and
    inward (across the room, on larger loops); the test loop lies in between and sweeps its yaw
    across both, so its views stay within what the train cameras cover. test_fps 0: the n_test
    frames are spread evenly over the whole test loop; test_fps > 0: they are consecutive frames
    of a walk along it (one loop in LOOP_SECONDS) from its start. The train paths do not depend
    on n_test or test_fps.
    """
    count = len(train_sizes)
    train = []
    for k, n in enumerate(train_sizes):
        inward = k % 2 == 1
        scale = 1.0 - 0.3 * k / max(count - 1, 1) if inward else 0.7 + 0.15 * k / max(count - 1, 1)
        train.append(path_poses(random_path(rng, room, scale, np.pi if inward else 0.0), n))
    test_path = random_path(rng, room, 0.85, np.pi / 2 * rng.choice([-1.0, 1.0]))
    test_path.yaw_amp = rng.uniform(1.2, 1.5)
    if test_fps > 0:
        test = path_poses_at(test_path, np.arange(n_test) / (test_fps * LOOP_SECONDS))
    else:
        test = path_poses(test_path, n_test)
    centres = np.concatenate([c[:, :3, 3] for c in train] + [test[:, :3, 3]])
    if len(centres) and clearance(room, centres).min() < MIN_CLEARANCE:  # guaranteed by the layout
        raise RuntimeError("synthetic camera path comes closer than 0.5 m to a surface")
    return train, test
