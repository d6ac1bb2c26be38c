"""Test-time pose refinement against a trained feature field (NeFeS, pose and APR targets).

Per batch of queries: encode each query image once with the run's 2D encoder G; optionally turn
each camera to the best window of one widened render (rotation search); then the feature phase
aligns the field's rendered (fused) features with the query's, by direct alignment against a few
rendered keyframes (the default, fastnefes.refine.direct_alignment), by Adam (NeFeS: preset
"nefes") or by Levenberg-Marquardt on the feature residual (preset "lm",
fastnefes.refine.feature_gauss_newton), on an se(3) increment per query (target "pose") or, by
Adam, on a per-query copy of the APR's weights (target "apr"); a photometric polish (direct
alignment, or Levenberg-Marquardt on RGB, coarse to fine) pins the pose down.
Renders after a phase's first may sample a thin band around the surface that render found
(fastnefes.refine.surface). A verification step keeps the initial pose when the feature phase did
not lower the feature loss (the polish is guarded by its own loss).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
import math
import time
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastnefes.geometry import se3_exp, se3_log
from fastnefes.refine import phases as phases_module
from fastnefes.refine.apr_target import polish_apr_results, refine_apr_weights
from fastnefes.refine.config import RefineConfig
from fastnefes.refine.gauss_newton import levenberg_marquardt_phase
from fastnefes.refine.losses import feature_metric_loss, photometric_loss
from fastnefes.refine.phases import Phase
from fastnefes.refine.pose_jacobian import render_with_jacobian
from fastnefes.refine.render_memo import RenderMemo
from fastnefes.refine.result import QueryDiagnostics, RefineResult
from fastnefes.refine.surface import RaySampler
from fastnefes.timing import section


@contextmanager
def frozen(model: torch.nn.Module):
    """The model's parameters stop requiring gradients for the block (pose gradients only: the
    backward passes skip e.g. the hash table's scatter), and are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def coarsened(stride: int, height: int, width: int, max_pixels: int) -> int:
    """stride doubled while a height x width image's grid at it has more than max_pixels pixels
    (max_pixels 0 or no image size: stride)."""
    while max_pixels > 0 and height and (height // stride) * (width // stride) > max_pixels:
        stride *= 2
    return stride


class Refiner:
    """Refines query poses against one trained feature-field model.

    Args:
        model: a trained FeatureFieldModel (fastnefes.field.model), in eval mode on its device.
        config: RefineConfig.
    """

    def __init__(self, model, config: RefineConfig | None = None):
        self.model = model.eval()
        self.config = config or RefineConfig()
        self.device = next(model.parameters()).device
        self.memo: Optional[RenderMemo] = None  # set during refine()

    @contextmanager
    def _render_memo(self):
        """Context of one refine call: whole-view renders without gradients are reused
        (fastnefes.refine.render_memo)."""
        self.memo = RenderMemo(self.model)
        try:
            yield
        finally:
            self.memo = None

    def frozen_model(self):
        """Context: the model's weights do not require gradients (pose gradients only)."""
        return frozen(self.model)

    # -- query side -------------------------------------------------------------------------
    def stride(self, height: int = 0, width: int = 0) -> int:
        """The first phase's render stride: config.stride, else the encoder's, doubled (with the
        image size given) while the map has more than config.max_feature_pixels pixels."""
        cfg = self.config
        return coarsened(cfg.stride or int(self.model.feature_stride), height, width, cfg.max_feature_pixels)

    def phases(self, height: int = 0, width: int = 0) -> list[Phase]:
        cfg = self.config
        out = [Phase(cfg.signal, self.stride(height, width), cfg.iters, cfg.coarse_iters, 1.0, cfg.method)]
        if cfg.polish_iters > 0:
            for level in reversed(range(max(1, cfg.polish_levels))):
                out.append(Phase("rgb", cfg.polish_stride * 2**level, cfg.polish_iters, 0, cfg.polish_lr_fraction,
                                 cfg.polish_method))
        return out

    @torch.no_grad()
    def encode_queries(self, images: np.ndarray | torch.Tensor, signal: Optional[str] = None,
                       stride: Optional[int] = None) -> torch.Tensor:
        """Query targets at the render resolution: [B, C, H/s, W/s] (features, or RGB for signal rgb)."""
        signal, s = signal or self.config.signal, stride or self.stride()
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, device=self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0 if x.dtype == torch.uint8 else x
        h, w = x.shape[-2] // s, x.shape[-1] // s
        if signal == "rgb":
            return F.interpolate(x, size=(h, w), mode="area")
        with section("encoder"):
            feats = self.model.encode_images(x)
        factor = feats.shape[-1] // max(w, 1)
        if factor > 1 and feats.shape[-2:] == (h * factor, w * factor):  # a coarser stride: average
            feats = F.avg_pool2d(feats, factor)
        elif feats.shape[-2:] != (h, w):
            feats = F.interpolate(feats, size=(h, w), mode="bilinear", align_corners=False)
        return feats

    # -- render side ------------------------------------------------------------------------
    def render_signal(self, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int, stride: int,
                      signal: Optional[str] = None, sampler: Optional[RaySampler] = None,
                      rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rendered features (or RGB) [B, C, height/stride, width/stride] at poses c2w [B, 4, 4],
        by a full march, or at a RaySampler's samples of the queries `rows` (its pixels: the grid)."""
        from fastnefes.render import render_image

        rgb_only = (signal or self.config.signal) == "rgb"
        if sampler is None:
            if self.memo is not None:
                out = self.memo.render(K, c2w, height, width, stride, fused=not rgb_only, with_features=not rgb_only)
            else:
                out = render_image(self.model, K, c2w, height, width, stride=stride, fused=not rgb_only,
                                   with_features=not rgb_only)
            return out["rgb" if rgb_only else "fused"].permute(0, 3, 1, 2)
        out = render_with_jacobian(self.model, sampler, rows, c2w, with_features=not rgb_only, jacobian=False)
        h, w = height // stride, width // stride
        rgb = out.rgb.transpose(1, 2).reshape(-1, 3, h, w)
        if rgb_only:
            return rgb
        with section("field_forward"):
            return self.model.fusion(rgb, out.features.transpose(1, 2).reshape(rgb.shape[0], -1, h, w))

    def loss(self, rendered: torch.Tensor, target: torch.Tensor, signal: Optional[str] = None) -> torch.Tensor:
        """[B] losses between rendered and query maps [B, C, h, w]."""
        with section("loss"):
            if (signal or self.config.signal) == "rgb":
                return photometric_loss(rendered, target)
            return feature_metric_loss(rendered, target, self.config.loss)

    def _loss_at(self, K, c2w, target, height, width, stride, factor: int = 1, signal: Optional[str] = None,
                 sampler: Optional[RaySampler] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        if factor > 1:
            target = F.avg_pool2d(target, factor)
        rendered = self.render_signal(K, c2w, height, width, stride * factor, signal, sampler, rows)
        return self.loss(rendered, target[..., : rendered.shape[-2], : rendered.shape[-1]], signal)

    # -- public API -------------------------------------------------------------------------
    def refine(
        self,
        images: np.ndarray,
        K: np.ndarray,
        init_c2w: np.ndarray,
        apr=None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> RefineResult:
        """Refine a batch of queries.

        Args:
            images: [B, H, W, 3] uint8 query images.
            K: [B, 3, 3] intrinsics at the images' resolution.
            init_c2w: [B, 4, 4] initial camera-to-world poses (dataset frame). With target "apr"
                they are ignored: the APR's prediction is the initial pose.
            apr: the APR module, for target "apr".
            progress: called with the number of queries finished.
        """
        with self.frozen_model(), self._render_memo():
            result = self._refine(images, K, init_c2w, apr, progress)
            if self.config.verify and self.config.verify_rays > 0:
                from fastnefes.refine.verify import apply_verification

                t0 = time.perf_counter()
                with section("verification"):
                    apply_verification(self.model, np.asarray(images), np.asarray(K), result,
                                       self.config.verify_rays, self.config.verify_margin,
                                       self.config.verify_min_fraction, render=self.memo.render)
                share = (time.perf_counter() - t0) / max(len(result.diagnostics), 1)
                for d in result.diagnostics:  # latency includes the check
                    d.wall_time_s += share
            return result

    def _refine(self, images, K, init_c2w, apr, progress) -> RefineResult:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        if self.config.target == "apr":
            if apr is None:
                raise ValueError("target 'apr' needs an APR")
            if self.config.method != "adam":  # the APR's weights have no closed-form warp Jacobian
                raise ValueError(f"target 'apr' is refined by Adam on the APR's weights, not method "
                                 f"{self.config.method!r}: use RefineConfig.preset('nefes', target='apr')")
            results = [refine_apr_weights(self, images[i : i + 1], K[i : i + 1], apr) for i in range(len(images))]
            result = RefineResult(np.concatenate([r.poses for r in results]), np.concatenate([r.initial for r in results]),
                                  [d for r in results for d in r.diagnostics])
            if self.config.polish_iters > 0:  # the photometric polish then refines the APR's refined pose
                result = polish_apr_results(self, images, K, result)
            if progress:
                progress(len(images))
            return result
        return self._refine_poses(images, K, init_c2w, progress)

    def _refine_poses(self, images, K_np, init_np, progress) -> RefineResult:
        cfg = self.config
        t0 = time.perf_counter()
        B, H, W = images.shape[:3]
        dev = self.device
        K = torch.as_tensor(K_np, dtype=torch.float32, device=dev)
        init = torch.as_tensor(init_np, dtype=torch.float32, device=dev)
        phases = self.phases(H, W)
        delta = torch.zeros(B, 6, device=dev)  # se(3) increment on the initial pose, per query
        failed = torch.zeros(B, dtype=torch.bool)
        iters = torch.zeros(B, dtype=torch.long)
        first = self.encode_queries(images, phases[0].signal, phases[0].stride)  # judges the result
        with torch.no_grad():
            initial_loss = self._loss_at(K, init, first, H, W, phases[0].stride, signal=phases[0].signal)
        # Every phase optimises an increment on `base`: the rotation search's or match-then-solve's
        # pose where it helped.
        base, base_loss = init, initial_loss
        if cfg.search_pad > 0 and phases[0].iters > 0:  # the start of the feature phase (none: polish only)
            base, base_loss = self._search_start(K, init, first, H, W, phases[0], initial_loss)
        turned = ~(base == init).flatten(1).all(1)  # [B] queries the search turned
        if cfg.match_rounds > 0 and phases[0].signal == "features":
            base = self._match_start(K, base, first, H, W, phases[0].stride, base_loss)
        converged, judged = self._first_phase(phases[0], K, base, init, first, H, W, delta, failed, iters, turned,
                                              alone=len(phases) == 1, progress=progress)
        if len(phases) > 1:
            converged = self._polish(images, phases[1:], K, base, H, W, delta, failed, iters, progress)
        final = base @ se3_exp(delta)
        with torch.no_grad():  # reported: the first phase's loss at the returned pose
            final_loss = self._loss_at(K, final, first, H, W, phases[0].stride, signal=phases[0].signal)
        keep = ~torch.isfinite(final_loss) | ~torch.isfinite(final).flatten(1).all(1) | failed.to(dev)
        if cfg.verify:
            # Each phase is judged by its own signal: the first phase's result by the first loss
            # against the initial pose here, a polish phase by its RGB loss (it only keeps steps
            # that lower it). Judging the polished pose by the feature loss would undo a polish
            # that pinned the pose where a weak field's features are a little worse.
            if phases[0].iters == 0 and len(phases) > 1:
                # No first phase: the polish is the refinement, and it judged itself (it undoes,
                # or never takes, what did not lower its loss), so it is kept unless it came
                # back at its start.
                keep |= (delta == 0).all(1)
            else:
                keep |= (judged if judged is not None else final_loss) >= initial_loss
        out = torch.where(keep[:, None, None], init, final).double().cpu().numpy()
        wall = (time.perf_counter() - t0) / B
        diags = []
        for i in range(B):
            st = "converged" if bool(converged[i]) else "max_iters"
            if bool(failed[i]) or not math.isfinite(float(final_loss[i])):
                st = "failed"
            elif bool(keep[i]):
                st = "kept_initial"
            diags.append(QueryDiagnostics(float(initial_loss[i]), float(final_loss[i]), int(iters[i]), wall, st))
        return RefineResult(out, init.double().cpu().numpy(), diags)

    def _first_phase(self, phase: Phase, K, base, init, target, H, W, delta, failed, iters, turned, alone: bool,
                     progress) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The first (feature) phase with its optional second runs; returns (converged [B], its
        loss at its own result [B], the verification's verdict; None when it is the final pose).
        progress is reported only when it is alone (else the last polish phase reports)."""
        cfg = self.config
        converged = self._run_phase(phase, K, base, target, H, W, delta, failed, iters, progress if alone else None)
        if cfg.search_second_opinion and bool(turned.any()):
            # A turn can mimic a sideways offset: the unturned run, unchanged, as a second opinion.
            converged = self._keep_better_run(phase, K, base, init, target, H, W, delta, failed, iters, converged,
                                              turned.nonzero()[:, 0])
        for k in range(cfg.restarts):
            # From the initial pose, not the search's turn; no coarse iterations, step sizes halved per restart.
            variant = replace(phase, coarse_iters=0, lr_fraction=phase.lr_fraction * 0.5**k)
            converged = self._keep_better_run(variant, K, base, init, target, H, W, delta, failed, iters, converged,
                                              torch.arange(delta.shape[0], device=delta.device))
        if alone or phase.iters == 0:
            return converged, None
        with torch.no_grad():
            judged = self._loss_at(K, base @ se3_exp(delta), target, H, W, phase.stride, signal=phase.signal)
        return converged, judged

    def _polish(self, images, phases: list[Phase], K, base, H, W, delta, failed, iters, progress) -> torch.Tensor:
        """The photometric phases after the first, coarse to fine, on delta [B, 6] in place;
        returns converged [B]. Each only keeps what lowers its loss: an Adam phase is undone for a
        query whose loss it did not lower, an LM phase keeps only such steps, and LM phases that
        fit a subset of the rays (polish_rays) are judged together on every pixel of the finest
        grid, since lowering the subset's loss can raise the other pixels'. Direct phases are
        judged together on that grid too (each keeps its own level's best keyframe, and a coarse
        level's best can be a finer level's worse), unless polish_judge is "keyframes": then each
        level's keyframe renders are its only judge (no renders for judging)."""
        cfg = self.config
        fine = phases[-1].stride
        finest = self.encode_queries(images, "rgb", fine)
        on_grid = ((cfg.polish_method == "direct" and cfg.polish_judge == "grid")
                   or (cfg.polish_method == "lm" and 0 < cfg.polish_rays < (H // fine) * (W // fine)))
        judge = coarsened(fine, H, W, cfg.polish_judge_pixels)  # the judge's grid
        judged = finest if judge == fine else self.encode_queries(images, "rgb", judge)
        converged = torch.zeros(delta.shape[0], dtype=torch.bool)
        with self._undone_unless_lower(K, base, delta, failed, judged, H, W, judge, "rgb") if on_grid else nullcontext():
            for n, phase in enumerate(phases):
                target = finest if phase.stride == fine else self.encode_queries(images, phase.signal, phase.stride)
                report = progress if n == len(phases) - 1 else None
                if phase.method == "direct":
                    converged = self._run_phase(phase, K, base, target, H, W, delta, failed, iters, report)
                    continue
                if phase.method == "lm":
                    converged = levenberg_marquardt_phase(self.model, K, base, target, H, W, phase.stride, phase.iters,
                                                          delta, failed, iters, self._tolerance(), self._max_step(),
                                                          cfg.lm_damping, cfg.polish_luma, report, cfg.polish_rays,
                                                          band_samples=cfg.band_samples,
                                                          remarch_fraction=cfg.remarch_fraction, ftol=cfg.lm_ftol,
                                                          jacobian_every=cfg.polish_jacobian_every)
                    continue
                with self._undone_unless_lower(K, base, delta, failed, target, H, W, phase.stride, phase.signal):
                    converged = self._run_phase(phase, K, base, target, H, W, delta, failed, iters, report)
        return converged

    @contextmanager
    def _undone_unless_lower(self, K, base, delta, failed, target, H, W, stride: int, signal: str):
        """Context: what the block does to delta [B, 6] (in place) is undone for each query whose
        loss against target at stride it did not lower (failed queries are left as they are)."""
        start = delta.clone()
        with torch.no_grad():
            before = self._loss_at(K, base @ se3_exp(delta), target, H, W, stride, signal=signal)
        yield
        with torch.no_grad():
            after = self._loss_at(K, base @ se3_exp(delta), target, H, W, stride, signal=signal)
        undo = ~(after < before) & ~failed.to(delta.device)
        delta[undo] = start[undo]

    def _keep_better_run(self, phase: Phase, K, base, init, target, H, W, delta, failed, iters, converged, rows
                         ) -> torch.Tensor:
        """Run `phase` again from the initial poses of the queries `rows` [R]; each keeps whichever
        run ends at the lower loss (delta, an increment on base, and failed, iters [B] updated in
        place; returns converged [B]). The second opinion of `restarts` and `search_second_opinion`."""
        rows_cpu = rows.cpu()
        d = torch.zeros(len(rows), 6, device=delta.device)
        f = torch.zeros(len(rows), dtype=torch.bool)
        it = torch.zeros(len(rows), dtype=torch.long)
        c = self._run_phase(phase, K[rows], init[rows], target[rows], H, W, d, f, it, None)
        with torch.no_grad():
            pose = init[rows] @ se3_exp(d)
            new = self._loss_at(K[rows], pose, target[rows], H, W, phase.stride, signal=phase.signal)
            old = self._loss_at(K[rows], base[rows] @ se3_exp(delta[rows]), target[rows], H, W, phase.stride,
                                signal=phase.signal)
        old = torch.where(failed[rows_cpu].to(old.device) | ~torch.isfinite(old), torch.full_like(old, math.inf), old)
        take = ~f.to(new.device) & torch.isfinite(new) & (new < old)
        delta[rows[take]] = se3_log(torch.linalg.inv(base[rows[take]]) @ pose[take])  # as an increment on base
        take_cpu = take.cpu()
        failed[rows_cpu[take_cpu]], converged[rows_cpu[take_cpu]] = False, c[take_cpu]
        iters[rows_cpu] += it
        return converged

    def _search_start(self, K, init, target, H, W, phase: Phase, initial_loss) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation search (fastnefes.refine.rotation_search): ([B,4,4] poses, each the turned
        pose where it lowered the first phase's loss, else the initial pose; [B] their losses)."""
        from fastnefes.refine.rotation_search import search_rotation

        cfg = self.config
        n, most = cfg.search_roll_steps, cfg.search_roll_deg
        rolls = tuple(float(r) for r in np.linspace(-most, most, n)) if n > 1 else (0.0,)
        with section("rotation_search"):
            turned, _ = search_rotation(self.model, target, K, init, H, W, phase.stride, cfg.search_pad, rolls,
                                        cfg.search_candidates, phase.signal)
            B, k = turned.shape[:2]
            with torch.no_grad():  # the windows only rank turns: ordinary renders judge them
                loss = self._loss_at(K.repeat_interleave(k, 0), turned.flatten(0, 1), target.repeat_interleave(k, 0),
                                     H, W, phase.stride, signal=phase.signal).view(B, k)
            loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
            value, pick = loss.min(1)
            better = value < initial_loss
            best = torch.where(better[:, None, None], turned[torch.arange(B, device=turned.device), pick], init)
        return best, torch.where(better, value, initial_loss)

    def _match_start(self, K, init, target, H, W, stride, initial_loss) -> torch.Tensor:
        """Match-then-solve rounds (fastnefes.refine.matching): [B,4,4] poses, each the PnP pose
        of a round where it lowered the feature loss, else the initial pose."""
        from fastnefes.refine.matching import match_and_solve

        cfg = self.config
        best, best_loss = init.clone(), initial_loss.clone()
        for _ in range(cfg.match_rounds):
            with section("matching"):
                candidate, counts = match_and_solve(self.model, target, K, best, H, W, stride, cfg.match_min_inliers,
                                                    cfg.match_reproj_factor)
            found = torch.as_tensor(counts > 0, device=init.device)
            if not bool(found.any()):
                break
            with torch.no_grad():
                loss = self._loss_at(K, candidate, target, H, W, stride)
            better = found & torch.isfinite(loss) & (loss < best_loss)
            best[better], best_loss[better] = candidate[better], loss[better]
        return best

    def _tolerance(self) -> torch.Tensor:
        return phases_module.tolerance(self)

    def _max_step(self, signal: str = "rgb") -> torch.Tensor:
        return phases_module.max_step(self, signal)

    def _run_phase(self, phase: Phase, K, init, target, H, W, delta, failed, iters, progress) -> torch.Tensor:
        """One phase on delta [B, 6] in place (fastnefes.refine.phases.run_phase); returns converged [B]."""
        return phases_module.run_phase(self, phase, K, init, target, H, W, delta, failed, iters, progress)
