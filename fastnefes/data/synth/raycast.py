"""Exact ray casting against the room's primitives (float64, vectorised over rays).

Rays are `origin + t * direction`, stored component-major: origins [3, 1] (one shared origin)
or [3, N], directions [3, N] of any length. When a camera ray's direction has camera-z 1, the
hit parameter t is the z-depth itself. Every intersection is closed-form (planes, slabs,
quadratics); a miss is t = inf. Objects are first culled with their bounding spheres.
"""

from __future__ import annotations

import numpy as np

from fastnefes.data.synth.room import Box, Cylinder, Plane, Primitive, Room, Sphere

# Hits closer than this (in ray parameter units) are ignored: they are the ray's own start.
T_MIN = 1e-9


def _near_root(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Smaller root of a t^2 + 2 b t + c = 0 for origins outside the quadric (c > 0).

    Uses t = c / (sqrt(b^2 - a c) - b), free of cancellation; inf where the ray misses or
    points away (b >= 0).
    """
    disc = b * b - a * c
    ok = (disc >= 0) & (b < 0) & (c > 0)
    t = np.full(ok.shape, np.inf)
    np.divide(c, np.sqrt(np.maximum(disc, 0)) - b, out=t, where=ok)
    return t


def intersect_plane(plane: Plane, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t [N] where rays (o [3, 1|N], d [3, N]) meet an inner room face from inside."""
    toward = d[plane.axis] * plane.sign < 0
    t = np.full(d.shape[1], np.inf)
    np.divide(plane.offset - o[plane.axis], d[plane.axis], out=t, where=toward)
    return np.where(t > T_MIN, t, np.inf)


def _box_local(box: Box, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World xy offsets -> the box's local xy (rotation by -yaw)."""
    c, s = np.cos(box.yaw), np.sin(box.yaw)
    return c * x + s * y, c * y - s * x


def intersect_box(box: Box, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t [N] of the entry point into an oriented box (slab method; origins outside the box)."""
    ox, oy = _box_local(box, o[0] - box.centre[0], o[1] - box.centre[1])
    dx, dy = _box_local(box, d[0], d[1])
    t_near, t_far = np.full(d.shape[1], -np.inf), np.full(d.shape[1], np.inf)
    for origin, direction, half in ((ox, dx, box.half[0]), (oy, dy, box.half[1]), (o[2] - box.centre[2], d[2], box.half[2])):
        inv = 1.0 / np.where(direction == 0, 1e-300, direction)  # finite: no 0 * inf NaNs
        ta, tb = (-half - origin) * inv, (half - origin) * inv
        t_near = np.maximum(t_near, np.minimum(ta, tb))
        t_far = np.minimum(t_far, np.maximum(ta, tb))
    return np.where((t_near <= t_far) & (t_near > T_MIN), t_near, np.inf)


def intersect_sphere(sphere: Sphere, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t [N] of the first hit with a sphere (origins outside it)."""
    oc = o - sphere.centre[:, None]
    a = (d * d).sum(0)
    b = (d * oc).sum(0)
    c = (oc * oc).sum(0) - sphere.radius**2
    t = _near_root(a, b, c)
    return np.where(t > T_MIN, t, np.inf)


def intersect_cylinder(cyl: Cylinder, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t [N] of the first hit with a capped vertical cylinder (origins outside it)."""
    ox, oy = o[0] - cyl.centre_xy[0], o[1] - cyl.centre_xy[1]
    a = d[0] * d[0] + d[1] * d[1]
    b = d[0] * ox + d[1] * oy
    c = ox * ox + oy * oy - cyl.radius**2
    t_side = _near_root(a, b, c)
    with np.errstate(invalid="ignore"):
        z = o[2] + t_side * d[2]
    best = np.where((z >= cyl.z0) & (z <= cyl.z1) & (t_side > T_MIN), t_side, np.inf)
    for z_cap, outside in ((cyl.z1, o[2] > cyl.z1), (cyl.z0, o[2] < cyl.z0)):
        crossing = outside & (d[2] != 0)
        t = np.full(d.shape[1], np.inf)
        np.divide(z_cap - o[2], d[2], out=t, where=crossing)
        with np.errstate(invalid="ignore"):
            rx, ry = ox + t * d[0], oy + t * d[1]
            inside = rx * rx + ry * ry <= cyl.radius**2
        best = np.minimum(best, np.where(inside & (t > T_MIN), t, np.inf))
    return best


_INTERSECT = {Plane: intersect_plane, Box: intersect_box, Sphere: intersect_sphere, Cylinder: intersect_cylinder}


def bounding_sphere(prim: Primitive) -> tuple[np.ndarray, float]:
    """Centre [3] and radius of a sphere enclosing an object."""
    if isinstance(prim, Sphere):
        return prim.centre, prim.radius
    if isinstance(prim, Box):
        return prim.centre, float(np.linalg.norm(prim.half))
    half_height = (prim.z1 - prim.z0) / 2
    centre = np.array([prim.centre_xy[0], prim.centre_xy[1], prim.z0 + half_height])
    return centre, float(np.hypot(prim.radius, half_height))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-ray dot product of component-major vectors [3, N] (or [3, 1])."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def intersect(prim: Primitive, o: np.ndarray, d: np.ndarray, dd: np.ndarray | None = None) -> np.ndarray:
    """t [N] of rays (o [3, 1|N], d [3, N]) with one primitive, inf where missed.

    dd: optional precomputed squared direction lengths [N] (saves work over many primitives).
    """
    if isinstance(prim, Plane):
        return intersect_plane(prim, o, d)
    centre, radius = bounding_sphere(prim)
    oc = o - centre[:, None]
    b = _dot(d, oc)
    c = _dot(oc, oc) - radius**2
    dd = _dot(d, d) if dd is None else dd
    candidates = np.nonzero((b * b >= dd * c) & ((b < 0) | (c <= 0)))[0]
    t = np.full(d.shape[1], np.inf)
    if len(candidates):
        o_sub = o if o.shape[1] == 1 else o[:, candidates]
        t[candidates] = _INTERSECT[type(prim)](prim, o_sub, d[:, candidates])
    return t


def cast(room: Room, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays from inside the room: (t [N], primitive index [N], -1 for none)."""
    best = np.full(d.shape[1], np.inf)
    index = np.full(d.shape[1], -1)
    dd = _dot(d, d)
    for k, prim in enumerate(room.primitives):
        t = intersect(prim, o, d, dd)
        closer = np.nonzero(t < best)[0]
        best[closer] = t[closer]
        index[closer] = k
    return best, index


def surface_frame(prim: Primitive, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local coordinates [3, N], local unit normals [3, N] and world unit normals [3, N] at
    points p [3, N] on the primitive's surface (local frame: the primitive's own axes)."""
    n = np.zeros_like(p)
    if isinstance(prim, Plane):
        n[prim.axis] = prim.sign
        return p, n, n
    if isinstance(prim, Sphere):
        local = p - prim.centre[:, None]
        return local, local / prim.radius, local / prim.radius
    if isinstance(prim, Box):
        lx, ly = _box_local(prim, p[0] - prim.centre[0], p[1] - prim.centre[1])
        local = np.stack([lx, ly, p[2] - prim.centre[2]])
        rel = local / prim.half[:, None]
        axis = np.argmax(np.abs(rel), axis=0)
        cols = np.arange(p.shape[1])
        n[axis, cols] = np.sign(rel[axis, cols])
        c, s = np.cos(prim.yaw), np.sin(prim.yaw)
        world = np.stack([c * n[0] - s * n[1], s * n[0] + c * n[1], n[2]])
        return local, n, world
    local = p - np.array([prim.centre_xy[0], prim.centre_xy[1], prim.z0])[:, None]
    rho = np.hypot(local[0], local[1])
    to_top, to_bottom = np.abs(p[2] - prim.z1), np.abs(p[2] - prim.z0)
    on_side = np.abs(rho - prim.radius) <= np.minimum(to_top, to_bottom)
    n[:2] = np.where(on_side, local[:2] / np.maximum(rho, 1e-12), 0.0)
    n[2] = np.where(on_side, 0.0, np.where(to_top <= to_bottom, 1.0, -1.0))
    return local, n, n


def shadowed(room: Room, p: np.ndarray, own: np.ndarray) -> np.ndarray:
    """[N] bool: is the point light hidden from surface points p [3, N] by an object other than
    the primitive each point lies on (`own` [N] indices)? Walls cannot block (the room is convex)
    and a convex object cannot shadow its own lit side, so rays are cast from the light to p
    and a hit before p (t < 1) on another object means shadow."""
    to_p = p - room.light_pos[:, None]
    dd = _dot(to_p, to_p)
    blocked = np.zeros(p.shape[1], dtype=bool)
    for k, prim in enumerate(room.primitives):
        if not isinstance(prim, Plane):
            blocked |= (intersect(prim, room.light_pos[:, None], to_p, dd) < 1.0) & (own != k)
    return blocked
