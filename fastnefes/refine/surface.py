"""Where a refinement phase samples its rays: a full march, or a thin band around a known surface.

Marching a ray through the occupancy grid (and the density pre-pass that culls samples behind
surfaces) is a large share of a refinement iteration, and it finds the same surface again and
again while the pose moves by millimetres. A SurfaceBand remembers, for a fixed set of pixels
per query, where each ray met the surface (its expected distance) and how far the march's
weight spread around it, and gives the march's own steps over that spread (at least `count`
of them, centred there), skipping empty cells of the occupancy grid as the march does: at the
marched pose the band renders exactly as the march. Each render in the band moves the
centres to the distances it found (where it found the surface), so the band follows the surface
while the camera moves a little at a time. A query's rays are marched again when its camera
moved, since the band was last centred, farther than the band can follow, or since the last
march DRIFT times that (occlusions change: a ray that hit nothing at the march renders the
background until the next one).

Both samplers return dense samples per ray ([H, S] interval bounds, zero-length intervals as
padding), which fastnefes.refine.pose_jacobian composites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastnefes.geometry import generate_rays
from fastnefes.ops.composite._torch_impl import sample_weights
from fastnefes.ops.occgrid._torch_impl import _step_index_before, _step_positions, occupied_at

DRIFT = 4.0  # re-march after this many band-following distances since the last march
WEIGHT_FLOOR = 1e-4  # samples of a march lighter than this are left out of a ray's band


def _rays(K: Tensor, c2w: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """World rays [B * N, 3] (origins, unit directions) through pixels [N, 2] or [B, N, 2]."""
    pix = pixels if pixels.dim() == 3 else pixels.expand(c2w.shape[0], *pixels.shape)
    origins, dirs, _ = generate_rays(K, c2w, pix)
    return origins.reshape(-1, 3), dirs.reshape(-1, 3)


@torch.no_grad()
def march(model, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The occupancy-grid march of world rays [R, 3] (dataset frame, unit directions), as
    rendering does it: packed (ray_indices [M] sorted, t_starts [M], t_ends [M]), unit cube."""
    from fastnefes.render import _sample

    near = model.normalization.near * float(model.normalization.scale)
    ray_idx, t0, t1, _ = _sample(model, model.to_unit(origins), dirs, False, near)
    return ray_idx, t0, t1


def padded(ray_idx: Tensor, t0: Tensor, t1: Tensor, n_rays: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed samples -> (index [H] of the rays that have any, t_starts [H, S], t_ends [H, S]),
    S the most samples of a ray; shorter rays end in zero-length intervals (no weight)."""
    counts = torch.bincount(ray_idx, minlength=n_rays)
    index = counts.nonzero()[:, 0]
    S = int(counts.max()) if ray_idx.numel() else 1
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(ray_idx.shape[0], device=ray_idx.device) - first[ray_idx]
    row = torch.zeros(n_rays, dtype=torch.long, device=ray_idx.device)
    row[index] = torch.arange(index.shape[0], device=ray_idx.device)
    last = t1[(first + counts - 1)[index]]  # each ray's far end: the padding sits there
    start = last[:, None].expand(index.shape[0], S).clone()
    end = start.clone()
    start[row[ray_idx], slot] = t0
    end[row[ray_idx], slot] = t1
    return index, start, end


@torch.no_grad()
def march_extent(model, origins: Tensor, dirs: Tensor, min_weight: float = WEIGHT_FLOOR
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A full march of world rays [R, 3], densities only: expected surface distance (unit cube;
    0 where nothing is hit), opacity, and the first and last distance of the samples that carry
    a weight above min_weight (lo, hi [R]; the expected distance where there are none)."""
    ray_idx, t0, t1 = march(model, origins, dirs)
    R = origins.shape[0]
    zeros = torch.zeros(R, device=origins.device)
    if ray_idx.numel() == 0:
        return zeros, zeros.clone(), zeros.clone(), zeros.clone()
    t_mid = (t0 + t1) * 0.5
    sigma = model.density(model.to_unit(origins)[ray_idx] + dirs[ray_idx] * t_mid[:, None])
    w = sample_weights(sigma, t0, t1, ray_idx, R)
    opacity = zeros.index_add(0, ray_idx, w)
    depth = torch.zeros_like(zeros).index_add(0, ray_idx, w * t_mid) / opacity.clamp_min(1e-6)
    heavy = w > min_weight
    lo = depth.clone().scatter_reduce(0, ray_idx[heavy], t0[heavy], "amin")
    hi = depth.clone().scatter_reduce(0, ray_idx[heavy], t1[heavy], "amax")
    return depth, opacity, lo, hi


@dataclass
class SurfaceBand:
    """Per query b and pixel n: where its ray met the surface at the last march.

    centre [B, N] the expected surface distance (unit cube); before, after [B, N] how far in
    front of and behind it the band reaches: the march's samples that carried weight, widened to
    at least `count` steps around the centre (a soft or thin surface spreads its weight over more
    steps than `count`, and a band narrower than that weight renders other colours); opacity
    [B, N] at the march; hit [B, N] bool (rays that met a surface, opacity at least min_opacity);
    marched_at [B, 4, 4] the poses of the last march; marched [B] bool; centred_at [B, 4, 4] the
    poses of the last march or render that moved the centres. Samples sit on the march's own
    lattice of steps (`spacing`, growing with the cone angle, from the near plane `near`, unit
    cube), so at the marched pose the band repeats the march's quadrature.
    """

    centre: Tensor
    before: Tensor
    after: Tensor
    opacity: Tensor
    hit: Tensor
    marched_at: Tensor
    marched: Tensor
    centred_at: Tensor
    count: int
    spacing: float
    near: float
    cone_angle: float = 0.0  # the march's steps grow to t * cone_angle (contracted space)
    min_opacity: float = 0.01

    @classmethod
    def empty(cls, model, n_queries: int, n_pixels: int, count: int) -> "SurfaceBand":
        dev = model.device
        eye = torch.eye(4, device=dev).repeat(n_queries, 1, 1)
        zeros = torch.zeros(n_queries, n_pixels, device=dev)
        return cls(zeros, zeros.clone(), zeros.clone(), zeros.clone(),
                   torch.zeros(n_queries, n_pixels, dtype=torch.bool, device=dev),
                   eye, torch.zeros(n_queries, dtype=torch.bool, device=dev), eye.clone(), count,
                   float(model.render_step_size), model.normalization.near * float(model.normalization.scale),
                   float(getattr(model.config, "cone_angle", 0.0)))

    def steps(self, centre: Tensor) -> Tensor:
        """The march's step size at distances centre [...] (unit cube)."""
        return torch.clamp(centre * self.cone_angle, min=self.spacing)

    def half_widths(self, centre: Tensor) -> Tensor:
        return 0.5 * self.count * self.steps(centre)

    def remarch(self, model, K: Tensor, c2w: Tensor, pixels: Tensor, rows: Tensor) -> None:
        """March the queries `rows` [r] again at poses c2w [r, 4, 4] (K [r, 3, 3]; pixels [N, 2]
        shared or [r, N, 2]), in place."""
        origins, dirs = _rays(K, c2w, pixels)
        t, opacity, lo, hi = march_extent(model, origins, dirs)
        half = self.half_widths(t)
        shape = (len(rows), -1)
        self.centre[rows] = t.view(shape)
        self.before[rows] = torch.maximum(t - lo, half).view(shape)
        self.after[rows] = torch.maximum(hi - t, half).view(shape)
        self.opacity[rows] = opacity.view(shape)
        self.hit[rows] = (opacity >= self.min_opacity).view(shape)
        self.marched_at[rows] = c2w.detach()
        self.centred_at[rows] = c2w.detach()
        self.marched[rows] = True

    def recentre(self, rows: Tensor, c2w: Tensor, depth: Tensor, opacity: Tensor) -> None:
        """Move the centres of the queries `rows` to the distances a band render at poses c2w
        [r, 4, 4] found (depth, opacity [r, N]), where it found the surface (at least half the
        march's opacity)."""
        found = self.hit[rows] & (opacity >= 0.5 * self.opacity[rows])
        self.centre[rows] = torch.where(found, depth, self.centre[rows])
        self.centred_at[rows] = c2w.detach()

    def stale(self, rows: Tensor, c2w: Tensor, scale: float, fraction: float) -> Tensor:
        """[r] bool: queries `rows` never marched, or whose camera at c2w [r, 4, 4] may see a
        surface more than `fraction` of the band's half width from where the band expects it
        (or DRIFT times that since the last march).

        The bound (unit cube): the camera centre's shift plus the turn times the farthest band
        distance. It holds for smooth surfaces; occlusion edges are what re-marching is for.
        scale: the model's unit-cube scale (dataset units -> unit cube).
        """
        if len(rows) == 0:
            return torch.zeros(0, dtype=torch.bool, device=c2w.device)
        centre = torch.where(self.hit[rows], self.centre[rows], torch.zeros_like(self.centre[rows]))
        half = self.half_widths(centre)
        far, narrowest = (centre + torch.where(self.hit[rows], self.after[rows], half)).amax(1), half.amin(1)

        def moved(since: Tensor) -> Tensor:  # the bound, in units of the narrowest half width
            rel = torch.linalg.solve(since[rows], c2w)
            cos = ((rel[:, 0, 0] + rel[:, 1, 1] + rel[:, 2, 2] - 1) * 0.5).clamp(-1.0, 1.0)
            return (rel[:, :3, 3].norm(dim=-1) * scale + torch.arccos(cos) * far) / narrowest

        return ~self.marched[rows] | (moved(self.centred_at) > fraction) | (moved(self.marched_at) > DRIFT * fraction)

    def samples(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples of the queries `rows` [r]: (index [H] into the r * N rays of each hit ray,
        t_starts [H, S], t_ends [H, S]) in unit-cube distance, on the march's lattice of steps
        from before to after the centre, none before the near plane; rays with fewer than S
        steps end in zero-length intervals (no weight)."""
        index = self.hit[rows].reshape(-1).nonzero()[:, 0]
        dev = self.centre.device
        if index.numel() == 0:
            empty = torch.zeros(0, 1, device=dev)
            return index, empty, empty.clone()
        centre = self.centre[rows].reshape(-1)[index].double()
        lo = torch.clamp(centre - self.before[rows].reshape(-1)[index], min=self.near)
        hi = torch.maximum(centre + self.after[rows].reshape(-1)[index], lo)
        near = torch.full_like(centre, self.near)
        first = _step_index_before(lo, near, self.spacing, self.cone_angle)
        last = _step_index_before(hi, near, self.spacing, self.cone_angle) + 1
        n = (last - first).clamp_min(1)
        S = int(n.max())
        k = first[:, None] + torch.minimum(torch.arange(S + 1, device=dev, dtype=centre.dtype)[None], n[:, None])
        edges = _step_positions(k, near[:, None], self.spacing, self.cone_angle).float()
        return index, edges[:, :-1], edges[:, 1:]


class RaySampler:
    """The samples of one phase's rays (pixels [N, 2] shared or [B, N, 2] per query) at candidate
    poses: a SurfaceBand of band_samples per ray (re-marched where `stale` at remarch_fraction),
    or, with band_samples 0, a full march every time (padded)."""

    def __init__(self, model, K: Tensor, pixels: Tensor, band_samples: int, remarch_fraction: float = 0.5):
        self.model, self.K, self.pixels = model, K, pixels
        self.remarch_fraction = remarch_fraction
        B = K.shape[0]
        self.band = SurfaceBand.empty(model, B, pixels.shape[-2], band_samples) if band_samples > 0 else None
        self.marches = 0  # queries marched, for the diagnostics

    def pixels_of(self, rows: Tensor) -> Tensor:
        return self.pixels if self.pixels.dim() == 2 else self.pixels[rows]

    def samples(self, rows: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(index [H], t_starts [H, S], t_ends [H, S]) of the queries `rows` [r] at poses c2w [r, 4, 4]."""
        if self.band is None:
            origins, dirs = _rays(self.K[rows], c2w, self.pixels_of(rows))
            self.marches += len(rows)
            return padded(*march(self.model, origins, dirs), origins.shape[0])
        stale = self.band.stale(rows, c2w, float(self.model.norm_scale), self.remarch_fraction)
        if bool(stale.any()):
            again = rows[stale]
            self.band.remarch(self.model, self.K[again], c2w[stale], self.pixels_of(again), again)
            self.marches += len(again)
        index, t0, t1 = self.band.samples(rows)
        if index.numel():  # as the march: no samples in empty cells of the occupancy grid
            origins, dirs = _rays(self.K[rows], c2w, self.pixels_of(rows))
            x = self.model.to_unit(origins[index])[:, None] + dirs[index][:, None] * ((t0 + t1) * 0.5)[..., None]
            grid = self.model.occupancy
            t1 = torch.where(occupied_at(x.reshape(-1, 3), grid.binaries, grid.aabbs).view(t0.shape), t1, t0)
        return index, t0, t1

    def observe(self, rows: Tensor, c2w: Tensor, depth: Tensor, opacity: Tensor) -> None:
        """A render of the queries `rows` at poses c2w found these distances and opacities
        ([r, N]): the band follows them (SurfaceBand.recentre)."""
        if self.band is not None:
            self.band.recentre(rows, c2w, depth, opacity)
