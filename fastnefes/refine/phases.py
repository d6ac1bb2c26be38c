"""One optimisation phase of the pose target: Adam or Levenberg-Marquardt on one signal.

A phase moves delta [B, 6] (se(3) increments on the phase's start poses) in place, marks the
queries that failed (a non-finite loss or gradient: the query stops, its delta frozen), counts
renders per query, and returns the [B] bool of queries that met the early-stop tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastnefes.geometry import pixel_grid, se3_exp
from fastnefes.refine.direct_alignment import direct_alignment_phase
from fastnefes.refine.feature_gauss_newton import feature_lm_phase
from fastnefes.refine.gauss_newton import levenberg_marquardt_phase
from fastnefes.refine.optim import BatchedAdam, lr_scale
from fastnefes.refine.surface import RaySampler
from fastnefes.timing import section


@dataclass(frozen=True)
class Phase:
    """Which signal, at which render stride, with which optimiser."""

    signal: str  # "features" or "rgb"
    stride: int  # image pixels per rendered pixel
    iters: int  # renders per query at most, coarse ones included
    coarse_iters: int  # the first iterations at coarse_factor times coarser maps
    lr_fraction: float  # Adam: step sizes relative to lr_rot / lr_trans
    method: str = "adam"  # "adam" or "lm" (Levenberg-Marquardt)


def per_axis(refiner, rot_rad: float, trans_unit: float) -> torch.Tensor:
    """[6] per-coordinate sizes of an se(3) increment: rotation in radians, translation given in
    the unit cube and returned in dataset units (world = unit / scale)."""
    trans = trans_unit / float(refiner.model.normalization.scale)
    return torch.tensor([rot_rad] * 3 + [trans] * 3, device=refiner.device)


def tolerance(refiner) -> torch.Tensor:
    """[6] early-stop step sizes."""
    return per_axis(refiner, math.radians(refiner.config.tol_rot_deg), refiner.config.tol_trans)


def max_step(refiner, signal: str = "rgb") -> torch.Tensor:
    """[6] trust region of a Levenberg-Marquardt step on this signal."""
    cfg = refiner.config
    if signal == "rgb":
        return per_axis(refiner, math.radians(cfg.lm_max_rot_deg), cfg.lm_max_trans)
    return per_axis(refiner, math.radians(cfg.lm_feature_max_rot_deg), cfg.lm_feature_max_trans)


def run_phase(refiner, phase: Phase, K, init, target, H, W, delta, failed, iters, progress) -> torch.Tensor:
    """The phase by its method (`lm_phase`, `direct_phase` or `adam_phase`)."""
    run = {"lm": lm_phase, "direct": direct_phase}.get(phase.method, adam_phase)
    return run(refiner, phase, K, init, target, H, W, delta, failed, iters, progress)


def coarse_to_fine(refiner, phase: Phase, target, progress):
    """The levels of a second-order phase: (renders, stride, target average-pooled to it, the
    progress callback or None) for the first coarse_iters renders at coarse_factor times the
    stride, then the rest at the stride; only the last level reports progress."""
    factor = refiner.config.coarse_factor
    levels = [(factor, phase.coarse_iters), (1, phase.iters - phase.coarse_iters)]
    for n, (f, count) in enumerate(levels):
        if count > 0:
            yield (count, phase.stride * f, F.avg_pool2d(target, f) if f > 1 else target,
                   progress if n == len(levels) - 1 else None)


def lm_phase(refiner, phase: Phase, K, init, target, H, W, delta, failed, iters, progress) -> torch.Tensor:
    """Levenberg-Marquardt, coarse to fine (coarse_to_fine), each level stopping early on its own."""
    cfg = refiner.config
    converged = torch.zeros(delta.shape[0], dtype=torch.bool)
    for count, stride, level_target, report in coarse_to_fine(refiner, phase, target, progress):
        if phase.signal == "rgb":
            converged = levenberg_marquardt_phase(refiner.model, K, init, level_target, H, W, stride, count, delta,
                                                  failed, iters, tolerance(refiner), max_step(refiner), cfg.lm_damping,
                                                  cfg.polish_luma, report, cfg.polish_rays,
                                                  band_samples=cfg.band_samples, remarch_fraction=cfg.remarch_fraction,
                                                  ftol=cfg.lm_ftol)
        else:
            converged = feature_lm_phase(refiner.model, K, init, level_target, H, W, stride, count, delta, failed,
                                         iters, tolerance(refiner), max_step(refiner, "features"), cfg.lm_damping,
                                         cfg.loss, cfg.fused, cfg.feature_rays, cfg.band_samples, cfg.remarch_fraction,
                                         report, cfg.lm_ftol)
    return converged


def direct_phase(refiner, phase: Phase, K, init, target, H, W, delta, failed, iters, progress) -> torch.Tensor:
    """Direct alignment against keyframes rendered at the current poses
    (fastnefes.refine.direct_alignment), coarse to fine (coarse_to_fine; phase.iters counts
    keyframes), direct_iters Gauss-Newton iterations per keyframe."""
    cfg = refiner.config
    converged = torch.zeros(delta.shape[0], dtype=torch.bool)
    for count, stride, level_target, report in coarse_to_fine(refiner, phase, target, progress):
        converged = direct_alignment_phase(refiner.model, K, init, level_target, H, W, stride, phase.signal, count,
                                           cfg.direct_iters, delta, failed, iters, tolerance(refiner),
                                           max_step(refiner, phase.signal), cfg.lm_damping,
                                           cfg.polish_rays if phase.signal == "rgb" else 0, report)
    return converged


def adam_phase(refiner, phase: Phase, K, init, target, H, W, delta, failed, iters, progress) -> torch.Tensor:
    """Adam on the loss's gradient (NeFeS), queries stopping early one by one; the first
    coarse_iters iterations at coarse_factor times the stride."""
    cfg, dev = refiner.config, refiner.device
    B = delta.shape[0]
    samplers = {f: RaySampler(refiner.model, K, pixel_grid(H, W, phase.stride * f, device=dev).reshape(-1, 2),
                              cfg.band_samples, cfg.remarch_fraction)
                for f in {1, cfg.coarse_factor}} if cfg.band_samples > 0 else {}
    lrs = per_axis(refiner, cfg.lr_rot, cfg.lr_trans) * phase.lr_fraction
    tol = tolerance(refiner)
    adam = BatchedAdam(B, lrs)
    quiet = torch.zeros(B, dtype=torch.long, device=dev)
    active = ~failed.clone()
    converged = torch.zeros(B, dtype=torch.bool)
    for it in range(phase.iters):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        rows_d = rows.to(dev)
        factor = cfg.coarse_factor if it < phase.coarse_iters else 1
        d = delta[rows_d].clone().requires_grad_(True)
        c2w = init[rows_d] @ se3_exp(d)
        loss = refiner._loss_at(K[rows_d], c2w, target[rows_d], H, W, phase.stride, factor, phase.signal,
                                samplers.get(factor), rows_d)
        with section("backward"):
            grad, = torch.autograd.grad(loss.sum(), d)
        with section("optimizer_step"):
            finite = torch.isfinite(grad).all(1) & torch.isfinite(loss.detach())
            grad = torch.where(finite[:, None], grad, torch.zeros_like(grad))
            update = adam.step(delta, grad, rows_d, lr_scale(phase.iters, it, cfg.lr_final_fraction))
        iters[rows] += 1
        if not bool(finite.all()):
            bad = rows[~finite.cpu()]
            failed[bad] = True
            active[bad] = False
        if factor == 1 and (it + 1) % cfg.check_every == 0:
            small = (update.abs() <= tol).all(1)
            quiet[rows_d] = torch.where(small, quiet[rows_d] + 1, torch.zeros_like(quiet[rows_d]))
            done = (quiet[rows_d] >= cfg.patience).cpu() & active[rows]
            converged[rows[done]] = True
            active[rows[done]] = False
        if progress:
            progress(int((~active).sum()))
    return converged
