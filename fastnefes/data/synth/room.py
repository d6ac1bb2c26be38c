"""A procedural metric indoor room: primitives, seeded layout and procedural textures.

World frame: metres, z up, the room is the box [0, Lx] x [0, Ly] x [0, Lz]. Every surface
carries a `Material` whose texture is evaluated at the hit point's surface coordinates
(triplanar projection of the primitive's local coordinates), with octaves and pattern edges
box-filtered by the pixel footprint so that nothing aliases at small image sizes.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Union

import numpy as np

ROOM_SIZE = (5.0, 4.0, 2.6)
PATTERNS = ("tiles", "planks", "checker", "stripes", "blobs")
# Low objects stay below this height, so cameras at >= LOW_OBJECT_TOP + 0.5 m clear them.
LOW_OBJECT_TOP = 0.7


@dataclass(eq=False)
class Material:
    """Procedural texture parameters; lengths in metres.

    colors: [3, 3] display-space RGB in [0, 1]: base, secondary (noise mix), accent (pattern).
    """

    colors: np.ndarray
    pattern: str
    pattern_scale: float
    noise_scale: float
    salt: int


@dataclass(eq=False)
class Plane:
    """An inner face of the room: p[axis] == offset, unit normal `sign` * e_axis into the room."""

    axis: int
    offset: float
    sign: float
    material: Material


@dataclass(eq=False)
class Box:
    """A box rotated by `yaw` (radians) about the vertical axis through `centre`."""

    centre: np.ndarray
    half: np.ndarray
    yaw: float
    material: Material

    @property
    def rotation(self) -> np.ndarray:
        """[3, 3] local-to-world rotation."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(eq=False)
class Sphere:
    centre: np.ndarray
    radius: float
    material: Material


@dataclass(eq=False)
class Cylinder:
    """A capped vertical cylinder: |p_xy - centre_xy| <= radius, z0 <= p_z <= z1."""

    centre_xy: np.ndarray
    radius: float
    z0: float
    z1: float
    material: Material


Primitive = Union[Plane, Box, Sphere, Cylinder]


@dataclass(eq=False)
class Room:
    """The whole static scene: six inner faces, then the objects, and the lights."""

    size: np.ndarray
    primitives: list = field(default_factory=list)
    light_pos: np.ndarray = field(default_factory=lambda: np.zeros(3))
    sun_dir: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))

    @property
    def objects(self) -> list:
        return [p for p in self.primitives if not isinstance(p, Plane)]


def clearance(room: Room, points: np.ndarray) -> np.ndarray:
    """Distance [N] from points [N, 3] inside the room to the nearest surface (negative inside a solid)."""
    d = np.full(len(points), np.inf)
    for prim in room.primitives:
        if isinstance(prim, Plane):
            dist = (points[:, prim.axis] - prim.offset) * prim.sign
        elif isinstance(prim, Sphere):
            dist = np.linalg.norm(points - prim.centre, axis=1) - prim.radius
        else:
            if isinstance(prim, Box):
                q = np.abs((points - prim.centre) @ prim.rotation) - prim.half
            else:
                radial = np.linalg.norm(points[:, :2] - prim.centre_xy, axis=1) - prim.radius
                mid, half = (prim.z0 + prim.z1) / 2, (prim.z1 - prim.z0) / 2
                q = np.stack([radial, np.abs(points[:, 2] - mid) - half], axis=1)
            dist = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)
        d = np.minimum(d, dist)
    return d


# ----------------------------------------------------------------------------- textures


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Integer lattice coordinates -> pseudo-random floats in [0, 1) (stateless, deterministic)."""
    h = (ix * 374761393 + iy * 668265263 + salt * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def value_noise(uv: np.ndarray, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1]; uv [N, 2] in lattice units -> [N]."""
    base = np.floor(uv)
    f = uv - base
    w = f * f * (3.0 - 2.0 * f)
    ix, iy = base[:, 0].astype(np.int64), base[:, 1].astype(np.int64)
    v00, v10 = _hash01(ix, iy, salt), _hash01(ix + 1, iy, salt)
    v01, v11 = _hash01(ix, iy + 1, salt), _hash01(ix + 1, iy + 1, salt)
    top = v00 + (v10 - v00) * w[:, 0]
    bottom = v01 + (v11 - v01) * w[:, 0]
    return top + (bottom - top) * w[:, 1]


def fbm(uv: np.ndarray, scale: float, octaves: int, salt: int, footprint: np.ndarray) -> np.ndarray:
    """Fractal value noise in [0, 1]: octave k has cells of scale / 2^k metres.

    An octave fades out once its cells approach the pixel footprint [N] (metres), replacing it
    by its mean, so the sum is band-limited for the image resolution.
    """
    total, norm, amp = np.zeros(len(uv)), 0.0, 1.0
    for k in range(octaves):
        cell = scale / 2**k
        angle = 0.9 * k + 0.3  # rotate each octave so lattice axes never line up
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        keep = np.clip(cell / (2.0 * footprint) - 1.0, 0.0, 1.0)
        n = value_noise(uv @ rot / cell + 17.3 * k, salt + 7919 * k)
        total += amp * (0.5 + keep * (n - 0.5))
        norm += amp
        amp *= 0.55
    return total / norm


def filtered_pulse(x: np.ndarray, duty: float, width: np.ndarray) -> np.ndarray:
    """Box-filtered periodic pulse (1 on [0, duty) of each unit period) over a window `width`.

    Exact average of the pulse train over [x - width/2, x + width/2] (x, width in periods).
    """

    def integral(t):
        return np.floor(t) * duty + np.minimum(t - np.floor(t), duty)

    w = np.maximum(width, 1e-6)
    return (integral(x + w / 2) - integral(x - w / 2)) / w


def _pattern(material: Material, uv: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Accent-colour mask [N] in [0, 1] of the material's pattern at uv [N, 2] (metres)."""
    s = material.pattern_scale
    u, v, fw = uv[:, 0] / s, uv[:, 1] / s, footprint / s
    if material.pattern == "checker":
        a, b = filtered_pulse(u, 0.5, fw), filtered_pulse(v, 0.5, fw)
        return a + b - 2 * a * b
    if material.pattern == "stripes":
        return filtered_pulse(u + 0.35 * np.sin(2.1 * v), 0.3, fw)
    if material.pattern == "tiles":
        grout_u, grout_v = filtered_pulse(u, 0.06, fw), filtered_pulse(v, 0.06, fw)
        tile = value_noise(np.stack([np.floor(u), np.floor(v)], 1) * 0.5 + 0.25, material.salt + 11)
        return np.maximum(grout_u, grout_v) + 0.45 * tile * (1 - np.maximum(grout_u, grout_v))
    if material.pattern == "planks":  # rows of width s, plank ends staggered per row
        row = np.floor(v)
        shift = _hash01(row.astype(np.int64), np.zeros_like(row, dtype=np.int64), material.salt)
        length = u / 4.0 + shift
        seam = np.maximum(filtered_pulse(v, 0.05, fw), filtered_pulse(length, 0.0125, fw / 4.0))
        tone = _hash01(row.astype(np.int64), np.floor(length).astype(np.int64), material.salt + 3)
        return np.maximum(seam, 0.5 * tone)
    if material.pattern == "blobs":
        n = value_noise(uv / s, material.salt + 5)
        soft = 0.03 + fw
        return np.clip((n - 0.62) / soft + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture pattern {material.pattern!r}")


def planar_texture(material: Material, uv: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Display-space albedo [N, 3] of `material` at surface coordinates uv [N, 2] (metres)."""
    c = material.colors
    mix = fbm(uv, material.noise_scale, 5, material.salt, footprint)[:, None]
    rgb = c[0] + (c[1] - c[0]) * np.clip((mix - 0.3) / 0.4, 0.0, 1.0)
    rgb = rgb + (c[2] - rgb) * (0.8 * _pattern(material, uv, footprint)[:, None])
    detail = fbm(uv + 3.7, material.noise_scale / 16, 3, material.salt + 1, footprint)[:, None]
    return np.clip(rgb * (0.7 + 0.6 * detail), 0.0, 1.0)


def surface_texture(material: Material, p_local: np.ndarray, n_local: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] at local points [N, 3] with local unit normals [N, 3] (triplanar mapping).

    Each projection's weight is |n_axis|^4 (normalised); a flat face aligned with the local axes
    gets exactly one projection, curved surfaces blend seamlessly (no uv seams on spheres).
    """
    weights = np.abs(n_local) ** 4
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.zeros((len(p_local), 3))
    for axis in range(3):
        used = weights[:, axis] > 1e-4
        if used.any():
            uv = p_local[used][:, [a for a in range(3) if a != axis]]
            out[used] += weights[used, axis, None] * planar_texture(material, uv, footprint[used])
    return out


# ----------------------------------------------------------------------------- layout


def _material(rng: np.random.Generator, hue: float, pattern: str, saturation: float, value: float, salt: int) -> Material:
    base = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    second = colorsys.hsv_to_rgb((hue + 0.07) % 1.0, saturation * 0.8, value * 0.62)
    accent = colorsys.hsv_to_rgb((hue + 0.45 + rng.uniform(-0.1, 0.1)) % 1.0, min(1.0, saturation + 0.25), value * 0.85)
    return Material(
        colors=np.array([base, second, accent]),
        pattern=pattern,
        pattern_scale=float(rng.uniform(0.18, 0.4)),
        noise_scale=float(rng.uniform(0.35, 0.7)),
        salt=salt,
    )


def _place_low_objects(rng: np.random.Generator, size: np.ndarray, taken: list, materials) -> list:
    """Objects whose top is <= LOW_OBJECT_TOP, anywhere on the floor without overlaps."""
    specs = ["table", "cube", "cube", "ball", "stool"]
    out = []
    for kind in specs:
        for _ in range(200):
            if kind == "table":
                half = np.array([rng.uniform(0.35, 0.5), rng.uniform(0.25, 0.35), rng.uniform(0.22, 0.26)])
            elif kind == "cube":
                half = np.full(3, rng.uniform(0.12, 0.22))
            else:
                half = np.full(3, rng.uniform(0.15, 0.25))
            r_foot = float(np.hypot(half[0], half[1])) if kind in ("table", "cube") else float(half[0])
            xy = rng.uniform(0.35 + r_foot, size[:2] - 0.35 - r_foot)
            if all(np.linalg.norm(xy - c) > r_foot + r + 0.15 for c, r in taken):
                break
        else:  # the floor is large enough that this never happens with the fixed room size
            raise RuntimeError("could not place the synthetic room's objects")
        taken.append((xy, r_foot))
        mat = next(materials)
        if kind in ("table", "cube"):
            out.append(Box(np.array([xy[0], xy[1], half[2]]), half, float(rng.uniform(0, np.pi)), mat))
            if kind == "table":  # a ball resting on the table top
                r = float(rng.uniform(0.08, LOW_OBJECT_TOP - 2 * half[2]) / 2)
                out.append(Sphere(np.array([xy[0], xy[1], 2 * half[2] + r]), r, next(materials)))
        elif kind == "ball":
            out.append(Sphere(np.array([xy[0], xy[1], half[0]]), float(half[0]), mat))
        else:
            out.append(Cylinder(xy, float(half[0]), 0.0, float(rng.uniform(0.4, 0.55)), mat))
    return out


def make_room(seed: int = 0) -> Room:
    """The seeded room: fixed 5 x 4 x 2.6 m box, seeded textures, furniture and lighting.

    Tall objects stand within 0.45 m of the walls, low ones (top <= LOW_OBJECT_TOP) anywhere,
    so cameras >= 0.95 m from the walls at heights >= 1.2 m keep >= 0.5 m clearance.
    """
    rng = np.random.default_rng([seed, 1])
    size = np.array(ROOM_SIZE)
    hue0 = rng.uniform()
    salts = iter(range(101, 100000, 97))
    hues = iter(hue0 + 0.618034 * k for k in range(1, 100))
    wall_patterns = list(rng.permutation(["stripes", "blobs", "checker", "tiles"]))

    def surface(pattern, sat, val):
        return _material(rng, next(hues), pattern, sat, val, next(salts))

    room = Room(size=size, light_pos=np.array([size[0] / 2, size[1] / 2, size[2] - 0.25]))
    sun = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 1.0])
    room.sun_dir = sun / np.linalg.norm(sun)
    room.primitives += [
        Plane(2, 0.0, 1.0, surface("planks", 0.45, 0.7)),
        Plane(2, size[2], -1.0, surface("tiles", 0.15, 0.85)),
    ]
    for i, (axis, offset, sign) in enumerate([(0, 0.0, 1.0), (0, size[0], -1.0), (1, 0.0, 1.0), (1, size[1], -1.0)]):
        room.primitives.append(Plane(axis, offset, sign, surface(wall_patterns[i], 0.3, 0.8)))

    objects = iter(lambda: surface(str(rng.choice(["checker", "blobs", "stripes", "tiles"])), 0.6, 0.75), None)
    # Tall furniture against two different walls, a pillar in a free corner, a picture on a wall.
    walls = rng.permutation(4)[:3]
    taken = []
    for k, wall in enumerate(walls[:2]):
        axis, at_max = (0, 1)[wall // 2], wall % 2
        along = 1 - axis
        depth, width = rng.uniform(0.18, 0.22), rng.uniform(0.4, 0.6)
        height = rng.uniform(0.7, 1.0) if k == 0 else rng.uniform(0.45, 0.6)
        centre = np.zeros(3)
        centre[axis] = size[axis] - 0.03 - depth if at_max else 0.03 + depth
        centre[along] = rng.uniform(0.9 + width, size[along] - 0.9 - width)
        centre[2] = height
        half = np.zeros(3)
        half[axis], half[along], half[2] = depth, width, height
        room.primitives.append(Box(centre, half, 0.0, next(objects)))
        taken.append((centre[:2], float(np.hypot(depth, width))))
    corner = np.array([[0.3, 0.3], [size[0] - 0.3, 0.3], [0.3, size[1] - 0.3], [size[0] - 0.3, size[1] - 0.3]])[rng.integers(4)]
    room.primitives.append(Cylinder(corner, float(rng.uniform(0.12, 0.18)), 0.0, float(size[2]), next(objects)))
    taken.append((corner, 0.2))
    wall = walls[2]
    axis, at_max = (0, 1)[wall // 2], wall % 2
    centre = np.zeros(3)
    centre[axis] = size[axis] - 0.02 if at_max else 0.02
    centre[1 - axis] = size[1 - axis] / 2 + rng.uniform(-0.5, 0.5)
    centre[2] = rng.uniform(1.3, 1.7)
    half = np.zeros(3)
    half[axis], half[1 - axis], half[2] = 0.02, rng.uniform(0.3, 0.5), rng.uniform(0.25, 0.35)
    room.primitives.append(Box(centre, half, 0.0, next(objects)))
    room.primitives += _place_low_objects(rng, size, taken, objects)
    return room
