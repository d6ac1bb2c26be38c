"""Rendered colours and features at given samples, with their Jacobian w.r.t. the pose.

The pose increment is local: a query at pose C renders at C @ se3_exp(eps), eps = (rotation w,
translation v), and the Jacobians are d value / d eps at eps = 0. A sample at distance t on the
ray through camera direction u (unit, camera frame) sits at x = to_unit(o) + t d with
d = R exp(w) u and o = C_t + R v, so dx / d eps = [t R (-[u]x), s R] (s: the unit-cube scale),
and a spatial gradient g (row vector) becomes the pose gradient [t u x (g R), s g R].
Compositing is differentiated in closed form: with tau_k = sigma_k delta_k and weights
w_k = T_k (1 - exp(-tau_k)), dw_k = T_(k+1) dtau_k - w_k sum_(j<k) dtau_j.

Two implementations with one signature: `render_samples` pushes tangents forward through the
field (fastnefes.refine.field_jacobian, the hash architecture), `render_samples_reverse` takes one
backward pass per output channel with a copy of the pose per ray (any architecture; the
reference the tests compare with).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnefes.geometry import camera_directions, generate_rays, se3_exp
from fastnefes.refine.field_jacobian import field_with_jacobian, supports
from fastnefes.refine.surface import RaySampler
from fastnefes.timing import section

TRANSMITTANCE_THRESHOLD = 1e-4  # as the compositing op: samples behind this contribute nothing


class RenderWithJacobian(NamedTuple):
    """Per query b and pixel n (B queries, N pixels)."""

    rgb: Tensor  # [B, N, 3] static colour over the background
    features: Optional[Tensor]  # [B, N, D] composited (unfused) features
    opacity: Tensor  # [B, N]
    depth: Tensor  # [B, N] expected surface distance (unit cube); 0 where nothing is hit
    d_rgb: Optional[Tensor]  # [B, N, 3, 6] d rgb / d eps
    d_features: Optional[Tensor]  # [B, N, D, 6]


def _pose_gradient(pos: Tensor, pos_t: Tensor, u: Tensor, R: Tensor, scale: float,
                   direction: Optional[Tensor] = None) -> Tensor:
    """Pose gradients [H, 6, C] of composited values from their samples' spatial gradients.

    pos = sum_k w_k g_k and pos_t = sum_k w_k t_k g_k [H, 3, C] (g_k: d value_k / d x, world
    axes; row d is axis d); direction (optional) = sum_k w_k d value_k / d ray direction. u [H, 3]
    unit camera directions, R [H, 3, 3] camera rotations, scale the unit-cube scale.
    Rotation part: u x ((pos_t + direction) R); translation part: scale (pos R).
    """
    turn = pos_t if direction is None else pos_t + direction
    turn = torch.einsum("hic,hij->hjc", turn, R)
    rot = torch.cross(u[:, :, None].expand_as(turn), turn, dim=1)
    return torch.cat([rot, torch.einsum("hic,hij->hjc", pos, R) * scale], 1)


def _rays(K: Tensor, c2w: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """origins, unit world directions and unit camera directions, each [B * N, 3]."""
    B = c2w.shape[0]
    pix = pixels if pixels.dim() == 3 else pixels.expand(B, *pixels.shape)
    origins, dirs, _ = generate_rays(K, c2w, pix)
    u = F.normalize(camera_directions(K[:, None], pix), dim=-1)
    return origins.reshape(-1, 3), dirs.reshape(-1, 3), u.reshape(-1, 3)


def _scatter(values: Tensor, index: Tensor, total: int, fill: Optional[Tensor] = None) -> Tensor:
    """values [H, ...] of the hit rays -> [total, ...], `fill` (broadcast) or zeros elsewhere."""
    out = values.new_zeros(total, *values.shape[1:]) if fill is None else fill.expand(total, *values.shape[1:]).clone()
    out[index] = values
    return out


def render_samples(model, K: Tensor, c2w: Tensor, pixels: Tensor, samples: tuple[Tensor, Tensor, Tensor],
                   with_features: bool = True, jacobian: bool = True) -> RenderWithJacobian:
    """Render rays at given samples, with their Jacobians with respect to a local pose increment.

    Args:
        K: [r, 3, 3] intrinsics (image resolution); c2w: [r, 4, 4] camera-to-world (dataset frame).
        pixels: [N, 2] image coordinates shared by the queries, or [r, N, 2].
        samples: (index [H] of the rays that have samples among the r * N, t_starts [H, S],
            t_ends [H, S]) in unit-cube distance (fastnefes.refine.surface); other rays see only
            the background.
        with_features: also the features (RGB always).
        jacobian: False returns values only (d_* None), through the ordinary render.
    Fields without forward tangents (field_jacobian.supports) take `render_samples_reverse`.
    """
    if samples[0].numel() == 0:  # no ray has samples (nothing in view): the background alone
        return _background_only(model, c2w.shape[0], pixels.shape[-2], with_features, jacobian)
    if not jacobian:
        return _render_values(model, K, c2w, pixels, samples, with_features)
    if not supports(model):
        return render_samples_reverse(model, K, c2w, pixels, samples, with_features)
    r = c2w.shape[0]
    origins, dirs, u = _rays(K, c2w, pixels)
    total = origins.shape[0]
    index, t0, t1 = samples
    t = (t0 + t1) * 0.5
    H, S = t.shape
    scale = float(model.norm_scale)
    o_unit = model.to_unit(origins[index])
    d_h = dirs[index]
    x = (o_unit[:, None] + d_h[:, None] * t[..., None]).reshape(-1, 3)
    ray_of_sample = torch.arange(H, device=x.device).repeat_interleave(S)
    with section("field_forward"):
        fs = field_with_jacobian(model, x, d_h, ray_of_sample, with_rgb=True, with_features=with_features)
    R = c2w[:, :3, :3].repeat_interleave(total // r, 0)[index]  # [H, 3, 3]
    u_h = u[index]
    bg = model.background()

    with section("compositing"):  # dense [H, S], and its tangents
        sigma = fs.density.view(H, S)
        delta = t1 - t0
        tau = sigma * delta
        T = torch.exp(-(torch.cumsum(tau, 1) - tau))
        keep = (T >= TRANSMITTANCE_THRESHOLD).to(T.dtype)
        w = T * (1.0 - torch.exp(-tau)) * keep
        # d tau / d eps [H, S, 6]: the spatial gradient g of the density, as a pose gradient.
        g_local = torch.einsum("hsi,hij->hsj", fs.d_density.view(H, S, 3), R)
        d_tau = torch.cat([torch.cross(u_h[:, None].expand_as(g_local), g_local, dim=-1) * t[..., None],
                           g_local * scale], -1) * delta[..., None]
        d_w = (keep * T * torch.exp(-tau))[..., None] * d_tau - w[..., None] * (torch.cumsum(d_tau, 1) - d_tau)
        # Colours and features as one set of C channels; their spatial tangents [H, S, 3, C].
        C = 3 + (fs.features.shape[-1] if with_features else 0)
        values = fs.rgb.view(H, S, 3) if not with_features else torch.cat([fs.rgb, fs.features], -1).view(H, S, C)
        d_rgb_s = fs.d_rgb.view(H, S, 6, 3)
        d_pos = d_rgb_s[:, :, :3] if not with_features else torch.cat([d_rgb_s[:, :, :3], fs.d_features.view(H, S, 3, C - 3)], -1)
        sums = torch.einsum("hks,hsic->hkic", torch.stack([w, w * t], 1), d_pos)  # sum_k w_k g_k, sum_k w_k t_k g_k
        turn = sums[:, 1].clone()
        turn[..., :3] += torch.einsum("hs,hsic->hic", w, d_rgb_s[:, :, 3:])  # the colour's ray-direction term
        local = torch.einsum("hkic,hij->hkjc", torch.stack([sums[:, 0], turn], 1), R)  # (g R)
        rot = torch.cross(u_h[:, :, None].expand(H, 3, C), local[:, 1], dim=1)
        d_opacity = d_w.sum(1)  # [H, 6]
        d_values = torch.cat([rot, local[:, 0] * scale], 1) + torch.einsum("hsc,hsj->hjc", values, d_w)  # [H, 6, C]
        d_values[..., :3] -= d_opacity[:, :, None] * bg
        opacity = w.sum(1)
        composited = torch.einsum("hs,hsc->hc", w, values)
        composited[:, :3] += (1 - opacity)[:, None] * bg - bg  # over the background, less the fill below
        depth = (w * t).sum(1) / opacity.clamp_min(1e-6)
        # One scatter of everything into the r * N rays (the others: background, zeros).
        packed = torch.cat([composited, opacity[:, None], depth[:, None], d_values.transpose(1, 2).reshape(H, 6 * C)], 1)
        full = packed.new_zeros(total, packed.shape[1]).index_put_((index,), packed)
    N = total // r
    rgb = (full[:, :3] + bg).view(r, N, 3)
    J = full[:, C + 2:].view(r, N, C, 6)
    return RenderWithJacobian(rgb, full[:, 3:C].view(r, N, C - 3) if with_features else None,
                              full[:, C].view(r, N), full[:, C + 1].view(r, N), J[:, :, :3],
                              J[:, :, 3:] if with_features else None)


def _background_only(model, r: int, N: int, with_features: bool, jacobian: bool) -> RenderWithJacobian:
    """The render of r * N rays that meet nothing: the background, zero features, opacity,
    depth and Jacobians."""
    dev, D = model.device, int(model.feature_dim)
    zeros = torch.zeros(r, N, device=dev)
    return RenderWithJacobian(
        model.background().detach().expand(r, N, 3).clone(),
        torch.zeros(r, N, D, device=dev) if with_features else None, zeros, zeros.clone(),
        torch.zeros(r, N, 3, 6, device=dev) if jacobian else None,
        torch.zeros(r, N, D, 6, device=dev) if jacobian and with_features else None)


def _rays_at(K: Tensor, c2w: Tensor, pixels: Tensor, index: Tensor, eps: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """World rays [H, 3] of the rays `index` among r * N (poses c2w @ exp(eps) per ray when
    eps [r, N, 6] is given)."""
    r = c2w.shape[0]
    pix = pixels if pixels.dim() == 3 else pixels.expand(r, *pixels.shape)
    N = pix.shape[1]
    poses = c2w[:, None].expand(r, N, 4, 4) if eps is None else c2w[:, None] @ se3_exp(eps.reshape(-1, 6)).view(r, N, 4, 4)
    origins, dirs, _ = generate_rays(K[:, None].expand(r, N, 3, 3), poses, pix)
    return origins.reshape(-1, 3)[index], dirs.reshape(-1, 3)[index]


def _render_values(model, K, c2w, pixels, samples, with_features, eps: Optional[Tensor] = None) -> RenderWithJacobian:
    """Values only, through render_rays at the given samples."""
    from fastnefes.render import render_rays

    index, t0, t1 = samples
    r, N = c2w.shape[0], pixels.shape[-2]
    origins, dirs = _rays_at(K, c2w, pixels, index, eps)
    ray_idx = torch.arange(index.shape[0], device=index.device).repeat_interleave(t0.shape[1])
    out = render_rays(model, origins, dirs, with_features=with_features,
                      samples=(ray_idx, t0.reshape(-1), t1.reshape(-1)))
    total = r * N
    depth = out["depth"] * model.norm_scale
    return RenderWithJacobian(
        _scatter(out["rgb"], index, total, model.background()).view(r, N, 3),
        _scatter(out["features"], index, total).view(r, N, -1) if with_features else None,
        _scatter(out["opacity"], index, total).view(r, N),
        _scatter(depth, index, total).view(r, N), None, None)


def render_samples_reverse(model, K: Tensor, c2w: Tensor, pixels: Tensor, samples: tuple[Tensor, Tensor, Tensor],
                           with_features: bool = True) -> RenderWithJacobian:
    """`render_samples` by reverse mode: each ray gets its own copy of the pose increment, so one
    backward pass per output channel gives every ray's row of the Jacobian."""
    r, N = c2w.shape[0], pixels.shape[-2]
    eps = torch.zeros(r, N, 6, device=c2w.device, requires_grad=True)
    with torch.enable_grad():
        out = _render_values(model, K, c2w, pixels, samples, with_features, eps)
        values = torch.cat([out.rgb] + ([out.features] if with_features else []), -1)  # [r, N, C]
        C = values.shape[-1]
        grads = [torch.autograd.grad(values[..., c].sum(), eps, retain_graph=c < C - 1, allow_unused=True)[0]
                 for c in range(C)]
    J = torch.stack([g if g is not None else torch.zeros_like(eps) for g in grads], 2)  # [r, N, C, 6]
    return RenderWithJacobian(out.rgb.detach(), out.features.detach() if with_features else None,
                              out.opacity.detach(), out.depth.detach(), J[:, :, :3], J[:, :, 3:] if with_features else None)


def render_with_jacobian(model, sampler: RaySampler, rows: Tensor, c2w: Tensor, with_features: bool = True,
                         jacobian: bool = True) -> RenderWithJacobian:
    """The sampler's rays of the queries `rows` [r] at poses c2w [r, 4, 4] (render_samples)."""
    with section("sampling"):
        samples = sampler.samples(rows, c2w)
    out = render_samples(model, sampler.K[rows], c2w, sampler.pixels_of(rows), samples, with_features, jacobian)
    sampler.observe(rows, c2w.detach(), out.depth.detach(), out.opacity.detach())
    return out
