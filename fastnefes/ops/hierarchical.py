"""NeRF's hierarchical sampler (the `--arch mlp` baseline): stratified bins, then importance samples.

Pure torch, dense per ray (every ray gets the same number of samples, no empty-space skipping),
as the original NeRF / NeFeS code. Distances are along unit directions in the unit cube.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastnefes.ops.occgrid._torch_impl import ray_aabb_intersect


def ray_range_in_unit_cube(origins: Tensor, dirs: Tensor, near: float) -> tuple[Tensor, Tensor]:
    """origins, dirs [R,3] -> (t_near [R], t_far [R]): the ray's span inside [0,1]^3 beyond `near`.

    Rays that miss the cube get t_far = t_near (zero-length bins: they render the background).
    """
    box = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], device=origins.device, dtype=origins.dtype)
    t_min, t_max, _ = ray_aabb_intersect(origins, dirs, box)
    t_near = t_min[:, 0].clamp_min(near)
    return t_near, torch.maximum(t_max[:, 0], t_near)


def stratified_edges(t_near: Tensor, t_far: Tensor, n_bins: int, stratified: bool,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """[R] spans -> bin edges [R, n_bins + 1], increasing; with `stratified` the inner edges are
    jittered by up to half a bin either way (training), else evenly spaced (rendering)."""
    u = torch.linspace(0.0, 1.0, n_bins + 1, device=t_near.device, dtype=t_near.dtype)
    if stratified and n_bins > 1:
        jitter = torch.rand(t_near.shape[0], n_bins - 1, device=t_near.device, generator=generator) - 0.5
        u = u.expand(t_near.shape[0], -1).clone()
        u[:, 1:-1] += jitter.to(u.dtype) / n_bins
    return t_near[:, None] + (t_far - t_near)[:, None] * u


def sample_pdf(edges: Tensor, weights: Tensor, n_samples: int, stratified: bool,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Inverse-CDF samples from piecewise-constant bin weights.

    Args:
        edges: [R, K+1] increasing bin edges; weights: [R, K] non-negative (need not sum to 1).
        stratified: random uniforms (training); else evenly spaced quantiles (deterministic).
    Returns:
        [R, n_samples] distances, sorted, within [edges[:, 0], edges[:, -1]] (no gradient).
    """
    weights = weights.detach() + 1e-5  # NeRF's floor: empty rays fall back to uniform
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], dim=-1).clamp(max=1.0)
    R = edges.shape[0]
    if stratified:
        u = torch.rand(R, n_samples, device=edges.device, generator=generator).to(edges.dtype)
        u = u.sort(-1).values
    else:
        u = torch.linspace(0.5 / n_samples, 1.0 - 0.5 / n_samples, n_samples, device=edges.device,
                           dtype=edges.dtype).expand(R, -1).contiguous()
    hi = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    lo = hi - 1
    c0, c1 = cdf.gather(-1, lo), cdf.gather(-1, hi)
    e0, e1 = edges.gather(-1, lo), edges.gather(-1, hi)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-10)).clamp(0.0, 1.0)
    return e0 + frac * (e1 - e0)


def dense_weights(sigmas: Tensor, edges: Tensor) -> Tensor:
    """Volume-rendering weights of dense bins: sigmas [R,K], edges [R,K+1] -> weights [R,K]
    (differentiable; transmittance via an exclusive cumulative sum of optical depths)."""
    tau = sigmas * (edges[:, 1:] - edges[:, :-1])
    trans = torch.exp(-torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1].cumsum(-1)], dim=-1))
    return trans * (1.0 - torch.exp(-tau))


def merge_edges(coarse_edges: Tensor, fine_t: Tensor) -> Tensor:
    """Edges of the fine pass: coarse edges [R,K+1] and importance samples [R,M] -> sorted [R,K+M+1]."""
    return torch.cat([coarse_edges.detach(), fine_t], dim=-1).sort(-1).values
