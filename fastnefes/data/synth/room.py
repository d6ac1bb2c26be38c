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
# Texture maths runs in float32 on separate coordinate arrays (u [N], v [N]): geometry stays
# float64, but colours need no more precision and this halves the memory traffic.


_HASH_X, _HASH_Y, _HASH_MIX = np.uint32(374761393), np.uint32(668265263), np.uint32(1274126177)


def _finish_hash(h: np.ndarray) -> np.ndarray:
    """Mixed uint32 lattice keys -> float32 in [0, 1)."""
    h = h * _HASH_MIX
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """int32 lattice coordinates [N] -> pseudo-random float32 in [0, 1) (stateless; uint32 wraps)."""
    return _finish_hash((ix.view(np.uint32) * _HASH_X) ^ (iy.view(np.uint32) * _HASH_Y + np.uint32(salt)))


def _lattice(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell (int32) and fractional position of float coordinates."""
    base = np.floor(x)
    return base.astype(np.int32), x - base


def value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: coordinates u, v [N] in lattice units -> [N]."""
    iu, fu = _lattice(u)
    iv, fv = _lattice(v)
    wu = fu * fu * (3 - 2 * fu)
    wv = fv * fv * (3 - 2 * fv)
    hu = iu.view(np.uint32) * _HASH_X  # the same keys as _hash01, sharing the products
    hv = iv.view(np.uint32) * _HASH_Y + np.uint32(salt)
    hu1, hv1 = hu + _HASH_X, hv + _HASH_Y
    v00, v10 = _finish_hash(hu ^ hv), _finish_hash(hu1 ^ hv)
    v01, v11 = _finish_hash(hu ^ hv1), _finish_hash(hu1 ^ hv1)
    top = v00 + (v10 - v00) * wu
    bottom = v01 + (v11 - v01) * wu
    return top + (bottom - top) * wv


def fbm(u: np.ndarray, v: np.ndarray, scale: float, octaves: int, salt: int, footprint: np.ndarray) -> np.ndarray:
    """Fractal value noise in [0, 1] at u, v [N] (metres): octave k has cells of scale / 2^k.

    An octave fades out (towards its mean) as its cells shrink from two pixel footprints [N]
    (metres) to one, so the sum is band-limited for the image resolution.
    """
    total, norm, amp = np.zeros_like(u), 0.0, 1.0
    inv_footprint = 1.0 / footprint
    for k in range(octaves):
        cell = scale / 2**k
        angle = 0.9 * k + 0.3  # rotate each octave so lattice axes never line up
        c, s = np.float32(np.cos(angle) / cell), np.float32(np.sin(angle) / cell)
        keep = np.clip(inv_footprint * np.float32(cell) - 1.0, 0.0, 1.0)  # 1 for cell >= 2 fp, 0 for <= fp
        total += amp * 0.5
        if keep.any():  # an octave finer than every pixel is just its mean
            n = value_noise(c * u - s * v + 17.3 * k, s * u + c * v, salt + 7919 * k)
            total += amp * keep * (n - 0.5)
        norm += amp
        amp *= 0.55
    return total / np.float32(norm)


def filtered_pulse(x: np.ndarray, duty: float, width: np.ndarray) -> np.ndarray:
    """Box-filtered periodic pulse (1 on [0, duty) of each unit period) over a window `width`.

    Exact average of the pulse train over [x - width/2, x + width/2] (x, width in periods).
    """

    def integral(t):
        whole = np.floor(t)
        return whole * duty + np.minimum(t - whole, duty)

    w = np.maximum(width, 1e-4)
    return (integral(x + w / 2) - integral(x - w / 2)) / w


def _pattern(material: Material, u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Accent-colour mask [N] in [0, 1] of the material's pattern at u, v [N] (metres)."""
    scale = np.float32(1.0 / material.pattern_scale)
    u, v, fw = u * scale, v * scale, footprint * scale
    if material.pattern == "checker":
        a, b = filtered_pulse(u, 0.5, fw), filtered_pulse(v, 0.5, fw)
        return a + b - 2 * a * b
    if material.pattern == "stripes":
        return filtered_pulse(u + 0.35 * np.sin(2.1 * v), 0.3, fw)
    if material.pattern == "tiles":
        grout = np.maximum(filtered_pulse(u, 0.06, fw), filtered_pulse(v, 0.06, fw))
        tone = _hash01(_lattice(u)[0], _lattice(v)[0], material.salt + 11)
        return grout + 0.45 * tone * (1 - grout)
    if material.pattern == "planks":  # rows of width s, plank ends staggered per row
        row = _lattice(v)[0]
        along = u / 4.0 + _hash01(row, np.zeros_like(row), material.salt)
        seam = np.maximum(filtered_pulse(v, 0.05, fw), filtered_pulse(along, 0.0125, fw / 4.0))
        tone = _hash01(row, _lattice(along)[0], material.salt + 3)
        return np.maximum(seam, 0.5 * tone)
    if material.pattern == "blobs":
        n = value_noise(u, v, material.salt + 5)
        return np.clip((n - 0.62) / (0.03 + fw) + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture pattern {material.pattern!r}")


def planar_texture(material: Material, u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Display-space albedo [3, N] of `material` at surface coordinates u, v [N] (metres)."""
    colors = material.colors.astype(np.float32)[:, :, None]
    mix = np.clip((fbm(u, v, material.noise_scale, 5, material.salt, footprint) - 0.3) / 0.4, 0.0, 1.0)
    rgb = colors[0] + (colors[1] - colors[0]) * mix
    rgb += (colors[2] - rgb) * (0.8 * _pattern(material, u, v, footprint))
    detail = fbm(u + 3.7, v, material.noise_scale / 16, 3, material.salt + 1, footprint)
    return np.clip(rgb * (0.7 + 0.6 * detail), 0.0, 1.0)


def surface_texture(material: Material, p_local: np.ndarray, n_local: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Albedo [3, N] at local points [3, N] with local unit normals [3, N] (triplanar mapping).

    Each projection's weight is |n_axis|^4 (normalised); a flat face aligned with the local axes
    gets exactly one projection, curved surfaces blend seamlessly (no uv seams on spheres).
    """
    p_local = p_local.astype(np.float32)
    footprint = footprint.astype(np.float32)
    weights = np.abs(n_local.astype(np.float32)) ** 4
    weights /= weights.sum(axis=0, keepdims=True)
    out = np.zeros((3, p_local.shape[1]), dtype=np.float32)
    for axis in range(3):
        used = np.nonzero(weights[axis] > 1e-4)[0]
        if len(used) == p_local.shape[1]:
            used = slice(None)
        elif len(used) == 0:
            continue
        a, b = [p_local[k, used] for k in range(3) if k != axis]
        out[:, used] += weights[axis, used] * planar_texture(material, a, b, footprint[used])
    return out


# ----------------------------------------------------------------------------- layout


def _material(rng: np.random.Generator, hue: float, pattern: str, saturation: float, value: float, salt: int) -> Material:
    base = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    second = colorsys.hsv_to_rgb((hue + 0.07) % 1.0, saturation * 0.8, value * 0.62)
    accent = colorsys.hsv_to_rgb((hue + rng.uniform(0.12, 0.2)) % 1.0, min(1.0, saturation + 0.3), value * 0.5)
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
                half = np.array([rng.uniform(0.35, 0.5), rng.uniform(0.25, 0.35), rng.uniform(0.18, 0.22)])
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
                r = float(rng.uniform(0.08, (LOW_OBJECT_TOP - 2 * half[2]) / 2))
                out.append(Sphere(np.array([xy[0], xy[1], 2 * half[2] + r]), r, next(materials)))
        elif kind == "ball":
            out.append(Sphere(np.array([xy[0], xy[1], half[0]]), float(half[0]), mat))
        else:
            out.append(Cylinder(xy, float(half[0]), 0.0, float(rng.uniform(0.4, 0.55)), mat))
    return out


def make_room(seed: int = 0) -> Room:
    """The seeded room: fixed 5 x 4 x 2.6 m box, seeded textures, furniture and lighting.

    Tall objects stand within 0.43 m of the walls (the pillar within 0.48 m of a corner), low
    ones (top <= LOW_OBJECT_TOP) anywhere, so cameras >= 0.95 m from the walls at heights
    >= LOW_OBJECT_TOP + 0.5 m keep >= 0.5 m clearance.
    """
    rng = np.random.default_rng([seed, 1])
    size = np.array(ROOM_SIZE)
    hue0 = rng.uniform()
    salts = iter(range(101, 100000, 97))
    # floor, ceiling and the four walls get evenly spread hues, the objects golden-ratio steps
    hues = iter([hue0 + 0.1, hue0 + 0.6] + [hue0 + 0.25 * k for k in range(4)] + [hue0 + 0.618034 * k for k in range(1, 100)])
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
        depth, width = rng.uniform(0.15, 0.2), rng.uniform(0.4, 0.6)
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
