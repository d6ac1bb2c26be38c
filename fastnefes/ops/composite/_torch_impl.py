"""Pure-PyTorch compositing of packed samples (reference twin of the native fused kernel).

For ray r with samples j (sorted by t, packed contiguously):
    dt_j = t_end_j - t_start_j,  alpha_j = 1 - exp(-sigma_j dt_j)
    T_j  = exp(-sum_{k<j} sigma_k dt_k)                      (exclusive, within the ray)
    w_j  = T_j alpha_j  if T_j >= transmittance_threshold else 0   (early termination)
    rgb = sum w_j rgb_j, features = sum w'_j f_j (w' = w.detach() if detach_feature_weights),
    depth = sum w_j (t_start_j + t_end_j) / 2, opacity = sum w_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CompositeOutput:
    """Per-ray results: rgb [R,3], features [R,D] or None, depth [R], opacity [R]. No background."""

    rgb: Tensor
    features: Tensor | None
    depth: Tensor
    opacity: Tensor


def check_packed_inputs(sigmas: Tensor, rgbs: Tensor, features: Tensor | None, t_starts: Tensor,
                        t_ends: Tensor, ray_indices: Tensor, n_rays: int) -> None:
    """Shape / order checks shared by every composite backend (ValueError on misuse)."""
    n = sigmas.shape[0]
    if sigmas.dim() != 1 or t_starts.shape != (n,) or t_ends.shape != (n,) or ray_indices.shape != (n,):
        raise ValueError(f"composite: sigmas, t_starts, t_ends, ray_indices must all be [N]; got "
                         f"{tuple(sigmas.shape)}, {tuple(t_starts.shape)}, {tuple(t_ends.shape)}, {tuple(ray_indices.shape)}")
    if rgbs.shape != (n, 3):
        raise ValueError(f"composite: rgbs must be [{n}, 3], got {tuple(rgbs.shape)}")
    if features is not None and (features.dim() != 2 or features.shape[0] != n):
        raise ValueError(f"composite: features must be [{n}, D], got {tuple(features.shape)}")
    if ray_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"composite: ray_indices must be integer, got {ray_indices.dtype}")
    if n > 0:
        if n_rays <= 0 or int(ray_indices.max()) >= n_rays or int(ray_indices.min()) < 0:
            raise ValueError(f"composite: ray_indices must lie in [0, {n_rays})")
        if n > 1 and bool((ray_indices[1:] < ray_indices[:-1]).any()):
            raise ValueError("composite: ray_indices must be sorted ascending (packed samples)")


# Samples behind this transmittance get zero weight (nerfacc's early stop).
TRANSMITTANCE_THRESHOLD = 1e-4


def exclusive_segment_sum(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """values [N, ...] packed by sorted ray_indices -> per sample, sum of the earlier values of its ray.

    Accumulated in float64: a global cumsum minus each ray's starting offset, so long batches do
    not lose the small per-ray sums to float32 cancellation.
    """
    inclusive = torch.cumsum(values.double(), dim=0)
    exclusive = inclusive - values.double()
    counts = torch.bincount(ray_indices, minlength=n_rays)
    starts = torch.cumsum(counts, dim=0) - counts  # first sample of each ray
    return (exclusive - exclusive[starts[ray_indices]]).to(values.dtype)


def sample_weights(sigmas: Tensor, t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor, n_rays: int,
                   transmittance_threshold: float = TRANSMITTANCE_THRESHOLD) -> Tensor:
    """Volume-rendering weights w_j = T_j alpha_j [N], zero once T_j < transmittance_threshold."""
    sigma_dt = sigmas * (t_ends - t_starts)
    transmittance = torch.exp(-exclusive_segment_sum(sigma_dt, ray_indices, n_rays))
    weights = transmittance * (1.0 - torch.exp(-sigma_dt))
    if transmittance_threshold > 0:
        weights = weights * (transmittance.detach() >= transmittance_threshold).to(weights.dtype)
    return weights


def _accumulate(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """values [N, ...] -> per-ray sums [n_rays, ...]."""
    out = torch.zeros((n_rays, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, ray_indices, values)


def composite_torch(sigmas: Tensor, rgbs: Tensor, features: Tensor | None, t_starts: Tensor, t_ends: Tensor,
                    ray_indices: Tensor, n_rays: int, detach_feature_weights: bool = True,
                    transmittance_threshold: float = TRANSMITTANCE_THRESHOLD) -> CompositeOutput:
    """Composite packed samples into per-ray rgb [R,3], features [R,D], depth [R], opacity [R].

    Args:
        sigmas: [N] densities; rgbs: [N,3]; features: [N,D] or None.
        t_starts, t_ends: [N] sample intervals along the ray.
        ray_indices: [N] long, sorted ascending (samples of a ray contiguous, ordered by t).
        n_rays: R; rays without samples give zeros.
        detach_feature_weights: features use w.detach() (NeFeS: features do not shape geometry).
        transmittance_threshold: samples with T_j below it contribute nothing (0 disables).
    """
    check_packed_inputs(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays)
    ray_indices = ray_indices.long()
    weights = sample_weights(sigmas, t_starts, t_ends, ray_indices, n_rays, transmittance_threshold)
    rgb = _accumulate(weights.unsqueeze(-1) * rgbs, ray_indices, n_rays)
    feats = None
    if features is not None:
        fw = weights.detach() if detach_feature_weights else weights
        feats = _accumulate(fw.unsqueeze(-1).to(features.dtype) * features, ray_indices, n_rays)
    depth = _accumulate(weights * (t_starts + t_ends) * 0.5, ray_indices, n_rays)
    opacity = _accumulate(weights, ray_indices, n_rays)
    return CompositeOutput(rgb=rgb, features=feats, depth=depth, opacity=opacity)
