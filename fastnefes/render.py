"""Rendering: rays -> occupancy-grid samples -> field -> composited RGB / features / depth.

(`--arch mlp` replaces the occupancy-grid march with NeRF's coarse-to-fine sampler.)

`render_rays` works on world rays (dataset frame and units); the model maps them into its unit
cube. `render_image` renders whole (optionally strided) images from batched intrinsics and poses
and is differentiable w.r.t. the poses: sample distances along a ray come from the (non
differentiable) march, but the sample positions o + t d follow the pose.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastnefes.field.model import FeatureFieldModel
from fastnefes.geometry import generate_rays, pixel_grid
from fastnefes.ops.composite import TRANSMITTANCE_THRESHOLD, composite
from fastnefes.timing import section
from fastnefes.ops.hierarchical import (dense_weights, merge_edges, ray_range_in_unit_cube, sample_pdf,
                                        stratified_edges)


def _sample(model: FeatureFieldModel, origins: Tensor, dirs: Tensor, stratified: bool, near: float
            ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Packed samples (ray_indices, t_starts, t_ends) in unit-cube distances, and the number of
    candidates the density pre-pass evaluated (0 without culling); no gradients."""
    cfg = model.config
    o, d = origins.detach(), dirs.detach()
    candidates = [0]

    def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        candidates[0] += t_starts.shape[0]
        x = o[ray_indices] + d[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]
        return model.density(x)

    schedule = model.occupancy.culling
    # The pre-pass changes rendered values only when it culls samples the compositing weighs.
    exact = cfg.alpha_thre <= 0 and cfg.early_stop_eps <= TRANSMITTANCE_THRESHOLD
    cull = cfg.cull_samples and (not exact or schedule.due())
    with torch.no_grad():
        samples = model.occupancy.sampling(o, d, sigma_fn=sigma_fn if cull else None, near_plane=near,
                                           render_step_size=model.render_step_size, early_stop_eps=cfg.early_stop_eps,
                                           alpha_thre=cfg.alpha_thre, stratified=stratified, cone_angle=cfg.cone_angle)
    if cull:
        schedule.record(candidates[0], samples[0].shape[0])
    return (*samples, candidates[0])


def _sample_hierarchical(model: FeatureFieldModel, origins: Tensor, dirs: Tensor, stratified: bool, near: float,
                         with_coarse_rgb: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """`--arch mlp`: NeRF's coarse pass over stratified bins, then importance samples from its
    weights. Returns the fine pass's packed samples (ray_indices, t_starts, t_ends) and, when
    asked (training), the coarse network's composited RGB [R,3] for its own photometric loss."""
    cfg = model.config
    o, d = origins.detach(), dirs.detach()
    t_near, t_far = ray_range_in_unit_cube(o, d, near)
    edges = stratified_edges(t_near, t_far, cfg.coarse_samples, stratified)
    R, K = edges.shape[0], cfg.coarse_samples
    x = o[:, None] + d[:, None] * ((edges[:, 1:] + edges[:, :-1]) * 0.5)[..., None]
    coarse_rgb = None
    with torch.set_grad_enabled(with_coarse_rgb and torch.is_grad_enabled()):
        geo = model.coarse["geometry"](x.reshape(-1, 3))
        weights = dense_weights(geo.density.view(R, K), edges)
        if with_coarse_rgb:
            per_sample_ray = torch.arange(R, device=o.device).repeat_interleave(K)
            rgb = model.coarse["color"](geo.geo_features, d, per_sample_ray).view(R, K, 3)
            coarse_rgb = (weights[..., None] * rgb).sum(1) + (1.0 - weights.sum(1))[:, None] * model.background()
    with torch.no_grad():
        fine_t = sample_pdf(edges, weights, cfg.fine_samples, stratified)
        fine_edges = merge_edges(edges, fine_t)
    n = fine_edges.shape[1] - 1
    ray_idx = torch.arange(R, device=o.device).repeat_interleave(n)
    return ray_idx, fine_edges[:, :-1].reshape(-1), fine_edges[:, 1:].reshape(-1), coarse_rgb


def render_rays(model: FeatureFieldModel, rays_o: Tensor, rays_d: Tensor, *, image_ids: Optional[Tensor] = None,
                act_histograms: Optional[Tensor] = None, with_features: bool = True, training: bool = False,
                near: Optional[float] = None, samples: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                with_distortion: bool = False) -> dict[str, Tensor]:
    """Render world rays.

    Args:
        rays_o, rays_d: [R,3] origins and unit directions in the dataset frame.
        image_ids: [R] long training-image indices: enables the transient head (NeRF-W).
        act_histograms: [R, bins] luma histograms of each ray's image: applies ACT to 'rgb_train'.
        with_features: also composite the static feature head.
        training: stratified sampling.
        near: near plane in dataset units (default: the scene normalisation's near).
        samples: packed samples (ray_indices [N] sorted, t_starts [N], t_ends [N]) in unit-cube
            distances to use instead of marching (e.g. fastnefes.refine.surface's band around a
            known surface); the positions still follow rays_o / rays_d.
        with_distortion: also 'distortion' [], the static density's distortion loss
            (fastnefes.train.losses.distortion_loss; distances squeezed in the contracted space).
    Returns:
        'rgb' [R,3] static colour over the background; 'rgb_train' [R,3] the colour compared with
        an image (static + transient when image_ids are given, through ACT when histograms are);
        'features' [R,D] (if with_features); 'depth' [R] expected ray distance of the surface
        (dataset units, given a hit; 0 where opacity is 0); 'opacity' [R]; with image_ids also
        'beta' [R] (>= beta_min) and 'transient_density' [] (mean over samples);
        'n_samples' [] long; 'n_candidates' [] long (samples the culling pre-pass evaluated);
        with `--arch mlp` and training, 'rgb_coarse' [R,3] (the coarse network's static colour).
    """
    n_rays = rays_o.shape[0]
    scale = model.norm_scale
    origins = model.to_unit(rays_o)
    near = model.normalization.near if near is None else near
    near_unit = near * float(model.normalization.scale)
    coarse_rgb = None
    with section("sampling"):
        if samples is not None:
            ray_idx, t0, t1 = samples
            n_candidates = 0
        elif model.config.arch == "mlp":
            ray_idx, t0, t1, coarse_rgb = _sample_hierarchical(model, origins, rays_d, training, near_unit, training)
            n_candidates = n_rays * model.config.coarse_samples  # the coarse network's samples
        else:
            ray_idx, t0, t1, n_candidates = _sample(model, origins, rays_d, training, near_unit)
    with section("field_forward"):
        t_mid = ((t0 + t1) * 0.5)[:, None]
        x = origins[ray_idx] + rays_d[ray_idx] * t_mid
        geo = model.geometry(x)
        rgb = model.color(geo.geo_features, rays_d, ray_idx)
        feats = None
        # The detaches below keep feature losses from shaping the geometry while training (NeFeS).
        # Outside training they must not apply: pose refinement needs the features' full gradient
        # with respect to the sample positions, through the encoding and the weights alike.
        if with_features:
            enc, gf = geo.encoding, geo.geo_features
            if model.training and not model.config.feature_grad_to_geometry:
                enc, gf = enc.detach(), gf.detach()
            feats = model.feature(enc, gf)
    with section("compositing"):
        static = composite(geo.density, rgb, feats, t0, t1, ray_idx, n_rays,
                           detach_feature_weights=model.training and model.config.detach_feature_weights)
    bg = model.background()
    out: dict[str, Tensor] = {
        "rgb": static.rgb + (1.0 - static.opacity)[:, None] * bg,
        "opacity": static.opacity,
        "depth": static.depth / static.opacity.clamp_min(1e-6) / scale,
        "n_samples": torch.as_tensor(ray_idx.shape[0]),
        "n_candidates": torch.as_tensor(n_candidates),
    }
    if feats is not None:
        out["features"] = static.features
    if with_distortion:
        out["distortion"] = _distortion(model, geo.density, t0, t1, ray_idx, n_rays)
    if coarse_rgb is not None:
        out["rgb_coarse"] = coarse_rgb
    rgb_train = out["rgb"]
    if image_ids is not None and model.transient is not None:
        tr = model.transient(geo.encoding, image_ids[ray_idx])
        total = geo.density + tr.density
        frac = tr.density / total.clamp_min(1e-10)
        # Two media in one volume: joint density, density-weighted colour (NeRF-W's rendering in
        # the small-step limit); beta composites with the transient share of each sample's weight.
        mixed = rgb * (1.0 - frac)[:, None] + tr.rgb * frac[:, None]
        joint = composite(total, mixed, (frac * tr.beta)[:, None], t0, t1, ray_idx, n_rays, detach_feature_weights=False)
        rgb_train = joint.rgb + (1.0 - joint.opacity)[:, None] * bg
        out["beta"] = joint.features[:, 0] + model.config.beta_min
        out["transient_density"] = tr.density.mean() if tr.density.numel() else tr.density.sum()
    if act_histograms is not None and model.act is not None:
        rgb_train = model.act(rgb_train, act_histograms)
    out["rgb_train"] = rgb_train
    return out


def _distortion(model: FeatureFieldModel, sigma: Tensor, t0: Tensor, t1: Tensor, ray_idx: Tensor, n_rays: int) -> Tensor:
    """The distortion loss [] of the static density sigma [N] at packed samples (unit-cube distances)."""
    from fastnefes.field.space import contract_distance
    from fastnefes.ops.composite import sample_weights
    from fastnefes.train.losses import distortion_loss

    weights = sample_weights(sigma, t0, t1, ray_idx, n_rays)
    if model.config.space == "contracted":
        t0, t1 = contract_distance(t0), contract_distance(t1)
    return distortion_loss(weights, t0, t1, ray_idx, n_rays)


def render_pixels(model: FeatureFieldModel, K: Tensor, c2w: Tensor, pixels: Tensor, fused: bool = True,
                  chunk: int = 1 << 16, act_histograms: Optional[Tensor] = None,
                  with_features: bool = True) -> dict[str, Tensor]:
    """Render the rays of B cameras through image coordinates pixels [B,h,w,2] (a grid, patches).

    Args:
        K: [B,3,3] intrinsics at the pixels' resolution; c2w: [B,4,4] OpenCV camera-to-world in
            the dataset frame (gradients flow back to it).
        fused: run the Feature Fusion module over [rgb, features].
        chunk: rays per field evaluation (bounds memory when no gradients are kept).
        act_histograms: [B, bins] luma histograms: also return 'rgb_act' (ACT-corrected colour).
        with_features: False skips the feature head (colour and geometry only; not with fused).
    Returns:
        [B,h,w,C] tensors: 'rgb', 'features' (raw composited, if with_features), 'fused' (if fused), 'depth'
        (z-depth, dataset units, 0 where nothing is hit) and 'opacity' ([B,h,w]).
    """
    if fused and not with_features:
        raise ValueError("render_pixels: fused needs the features (with_features=True)")
    device = model.device
    K = K.to(device=device, dtype=torch.float32)
    c2w = c2w.to(device=device, dtype=torch.float32)
    B, h, w = pixels.shape[:3]
    with section("ray_generation"):
        origins, dirs, z_per_t = generate_rays(K, c2w, pixels.to(device=device, dtype=torch.float32))
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    parts: dict[str, list[Tensor]] = {}
    for lo in range(0, origins.shape[0], chunk):
        out = render_rays(model, origins[lo:lo + chunk], dirs[lo:lo + chunk], training=model.training,
                          with_features=with_features)
        for key in ("rgb", "features", "depth", "opacity"):
            if key in out:
                parts.setdefault(key, []).append(out[key])
    result = {k: torch.cat(v).reshape(B, h, w, -1) for k, v in parts.items()}
    result["depth"] = result["depth"][..., 0] * z_per_t
    result["opacity"] = result["opacity"][..., 0]
    if fused:
        with section("field_forward"):  # the Feature Fusion module: part of the field
            fused_map = model.fusion(result["rgb"].permute(0, 3, 1, 2), result["features"].permute(0, 3, 1, 2))
        result["fused"] = fused_map.permute(0, 2, 3, 1)
    if act_histograms is not None and model.act is not None:
        result["rgb_act"] = exposure_adapted(model, result["rgb"], act_histograms)
    return result


def exposure_adapted(model: FeatureFieldModel, rgb: Tensor, histograms: Tensor) -> Tensor:
    """Rendered colour [B,h,w,3] through the ACT predicted from each view's luma histogram [B, bins]."""
    B = rgb.shape[0]
    Kc, b = model.act.transform(histograms.to(rgb.device))
    return model.act.apply_transform(rgb.reshape(B, -1, 3), Kc[:, None], b[:, None]).reshape(rgb.shape)


def render_image(model: FeatureFieldModel, K: Tensor, c2w: Tensor, height: int, width: int, stride: int = 1,
                 fused: bool = True, chunk: int = 1 << 16, act_histograms: Optional[Tensor] = None,
                 with_features: bool = True) -> dict[str, Tensor]:
    """Render B whole views of a height x width camera at 1/stride resolution.

    K [B,3,3] are the full-resolution intrinsics, c2w [B,4,4]; output pixel (i, j) is the ray
    through ((j + 0.5) s, (i + 0.5) s), h = height // stride. Outputs as `render_pixels`.
    """
    B = c2w.shape[0]
    pixels = pixel_grid(height, width, stride, device=model.device)
    return render_pixels(model, K, c2w, pixels.expand(B, *pixels.shape), fused, chunk, act_histograms, with_features)


# ---- visualisation ---------------------------------------------------------------------------
class FeaturePCA:
    """Three principal components of feature maps -> RGB, fitted once so all views share colours."""

    def __init__(self, features: Tensor) -> None:
        """features [N,D] (e.g. all pixels of a few views)."""
        f = features.reshape(-1, features.shape[-1]).float()
        self.mean = f.mean(0)
        _, _, v = torch.linalg.svd(f - self.mean, full_matrices=False)
        self.basis = v[:3].t()  # [D,3] (fewer columns if D < 3)
        proj = (f - self.mean) @ self.basis
        self.lo = torch.quantile(proj, 0.01, dim=0)
        self.hi = torch.quantile(proj, 0.99, dim=0)

    def __call__(self, features: Tensor) -> Tensor:
        """features [...,D] -> uint8 [...,3]."""
        proj = (features.float() - self.mean) @ self.basis
        rgb = ((proj - self.lo) / (self.hi - self.lo).clamp_min(1e-8)).clamp(0, 1)
        if rgb.shape[-1] < 3:
            rgb = torch.cat([rgb, rgb[..., -1:].expand(*rgb.shape[:-1], 3 - rgb.shape[-1])], -1)
        return (rgb * 255).round().to(torch.uint8)


def colorize_depth(depth: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> Tensor:
    """z-depth [H,W] -> uint8 [H,W,3] (turbo-like ramp, near = warm); 0 (no hit) -> black."""
    valid = depth > 0
    if lo is None or hi is None:
        vals = depth[valid]
        lo = float(vals.min()) if vals.numel() else 0.0
        hi = float(vals.max()) if vals.numel() else 1.0
    t = ((depth - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
    # Piecewise-linear warm-to-cool ramp (red, yellow, green, cyan, blue).
    stops = torch.tensor([[1.0, 0.1, 0.1], [1.0, 0.9, 0.1], [0.2, 0.8, 0.2], [0.1, 0.8, 0.9], [0.2, 0.2, 0.9]])
    pos = t * (len(stops) - 1)
    i0 = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - i0)[..., None]
    rgb = stops[i0] * (1 - frac) + stops[i0 + 1] * frac
    rgb = rgb * valid[..., None]
    return (rgb * 255).round().to(torch.uint8)


def contact_sheet(rows: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Tile uint8 [H,W,3] images, rows of equal-size tiles, with a white gap -> uint8 [H',W',3]."""
    h = max(t.shape[0] for row in rows for t in row)
    w = max(t.shape[1] for row in rows for t in row)
    n_cols = max(len(row) for row in rows)
    sheet = torch.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return sheet
