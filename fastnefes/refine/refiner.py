"""Test-time pose refinement against a trained feature field (NeFeS, pose and APR targets).

The pipeline per query, as in the paper: encode the query image once with the run's 2D encoder
G, then for each iteration render the field's fused features at the current pose at the same
resolution (only those rays), compute the feature-metric loss, and take an Adam step on the
pose increment (target "pose") or on a per-query copy of the APR's weights (target "apr").
A verification step keeps the initial pose when the final loss is not better.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastnefes.geometry import se3_exp
from fastnefes.refine.config import RefineConfig
from fastnefes.refine.losses import feature_metric_loss, photometric_loss

STATUS = ("converged", "max_iters", "kept_initial", "failed")


@dataclass
class QueryDiagnostics:
    initial_loss: float
    final_loss: float
    iterations: int
    wall_time_s: float
    status: str  # one of STATUS

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class RefineResult:
    poses: np.ndarray  # [B, 4, 4] refined camera-to-world, dataset frame
    initial: np.ndarray  # [B, 4, 4] the starting poses (the APR's prediction for target "apr")
    diagnostics: list[QueryDiagnostics] = field(default_factory=list)


class BatchedAdam:
    """Adam over a [B, P] tensor where each row has its own step count and can be frozen.

    torch.optim.Adam keeps moving a parameter with zero gradient through its momentum, so rows
    that stopped early would drift; here frozen rows do not move at all, and a row's trajectory
    does not depend on which other rows share the batch.
    """

    def __init__(self, n_rows: int, lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.lrs = lrs  # [P] per-column step size
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros(n_rows, lrs.numel(), dtype=lrs.dtype, device=lrs.device)
        self.v = torch.zeros_like(self.m)
        self.steps = torch.zeros(n_rows, 1, dtype=lrs.dtype, device=lrs.device)

    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Update param[rows] in place with grad [len(rows), P]; returns the update applied."""
        self.steps[rows] += 1
        t = self.steps[rows]
        self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad * grad
        m_hat = self.m[rows] / (1 - self.b1**t)
        v_hat = self.v[rows] / (1 - self.b2**t)
        update = -scale * self.lrs * m_hat / (v_hat.sqrt() + self.eps)
        param[rows] += update
        return update


def _lr_scale(cfg: RefineConfig, it: int) -> float:
    """Cosine decay from 1 to lr_final_fraction over the iterations."""
    if cfg.iters <= 1:
        return 1.0
    f = cfg.lr_final_fraction
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * it / (cfg.iters - 1)))


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

    # -- query side -------------------------------------------------------------------------
    def stride(self) -> int:
        return self.config.stride or int(self.model.feature_stride)

    @torch.no_grad()
    def encode_queries(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Query targets at the render resolution: [B, C, H/s, W/s] (features, or RGB for signal rgb)."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, device=self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0 if x.dtype == torch.uint8 else x
        s = self.stride()
        h, w = x.shape[-2] // s, x.shape[-1] // s
        if self.config.signal == "rgb":
            return F.interpolate(x, size=(h, w), mode="area")
        feats = self.model.encode_images(x)
        if feats.shape[-2:] != (h, w):
            feats = F.interpolate(feats, size=(h, w), mode="bilinear", align_corners=False)
        return feats

    # -- render side ------------------------------------------------------------------------
    def render_signal(self, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
        """Rendered features (or RGB) [B, C, height/stride, width/stride] at poses c2w [B, 4, 4]."""
        from fastnefes.render import render_image

        rgb_only = self.config.signal == "rgb"
        out = render_image(self.model, K, c2w, height, width, stride=stride, fused=not rgb_only)
        key = "rgb" if rgb_only else "fused"
        return out[key].permute(0, 3, 1, 2)

    def loss(self, rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.signal == "rgb":
            return photometric_loss(rendered, target)
        return feature_metric_loss(rendered, target, self.config.loss)

    def _loss_at(self, K, c2w, target, height, width, stride, factor: int = 1) -> torch.Tensor:
        if factor > 1:
            target = F.avg_pool2d(target, factor)
        rendered = self.render_signal(K, c2w, height, width, stride * factor)
        return self.loss(rendered, target[..., : rendered.shape[-2], : rendered.shape[-1]])

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
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        if self.config.target == "apr":
            if apr is None:
                raise ValueError("target 'apr' needs an APR")
            results = [self._refine_apr_one(images[i : i + 1], K[i : i + 1], apr) for i in range(len(images))]
            if progress:
                progress(len(images))
            return RefineResult(np.concatenate([r.poses for r in results]), np.concatenate([r.initial for r in results]),
                                [d for r in results for d in r.diagnostics])
        return self._refine_poses(images, K, init_c2w, progress)

    def _refine_poses(self, images, K_np, init_np, progress) -> RefineResult:
        cfg = self.config
        t0 = time.perf_counter()
        B, H, W = images.shape[:3]
        dev = self.device
        K = torch.as_tensor(K_np, dtype=torch.float32, device=dev)
        init = torch.as_tensor(init_np, dtype=torch.float32, device=dev)
        target = self.encode_queries(images)
        stride = self.stride()
        # Translation steps are taken in the unit cube: world = unit / scale.
        unit_to_world = 1.0 / float(self.model.normalization.scale)
        lrs = torch.tensor([cfg.lr_rot] * 3 + [cfg.lr_trans * unit_to_world] * 3, device=dev)
        delta = torch.zeros(B, 6, device=dev)
        adam = BatchedAdam(B, lrs)
        quiet = torch.zeros(B, dtype=torch.long, device=dev)
        iters = torch.zeros(B, dtype=torch.long)
        active = torch.ones(B, dtype=torch.bool)
        status = ["max_iters"] * B
        tol = torch.tensor([math.radians(cfg.tol_rot_deg)] * 3 + [cfg.tol_trans * unit_to_world] * 3, device=dev)

        with torch.no_grad():
            initial_loss = self._loss_at(K, init, target, H, W, stride)
        for it in range(cfg.iters):
            rows = active.nonzero()[:, 0]
            if rows.numel() == 0:
                break
            rows_d = rows.to(dev)
            factor = cfg.coarse_factor if it < cfg.coarse_iters else 1
            d = delta[rows_d].clone().requires_grad_(True)
            c2w = init[rows_d] @ se3_exp(d)
            loss = self._loss_at(K[rows_d], c2w, target[rows_d], H, W, stride, factor)
            grad, = torch.autograd.grad(loss.sum(), d)
            finite = torch.isfinite(grad).all(1) & torch.isfinite(loss.detach())
            grad = torch.where(finite[:, None], grad, torch.zeros_like(grad))
            update = adam.step(delta, grad, rows_d, _lr_scale(cfg, it))
            iters[rows] += 1
            if not bool(finite.all()):
                for r in rows[~finite.cpu()].tolist():
                    status[r] = "failed"
                    active[r] = False
            if factor == 1 and (it + 1) % cfg.check_every == 0:
                small = (update.abs() <= tol).all(1)
                quiet[rows_d] = torch.where(small, quiet[rows_d] + 1, torch.zeros_like(quiet[rows_d]))
                done = (quiet[rows_d] >= cfg.patience).cpu() & active[rows]
                for r in rows[done].tolist():
                    status[r] = "converged"
                    active[r] = False
            if progress:
                progress(int((~active).sum()))

        with torch.no_grad():
            final = init @ se3_exp(delta)
            final_loss = self._loss_at(K, final, target, H, W, stride)
        keep = ~torch.isfinite(final_loss) | ~torch.isfinite(final).flatten(1).all(1)
        if cfg.verify:
            keep |= final_loss >= initial_loss
        out = torch.where(keep[:, None, None], init, final).double().cpu().numpy()
        wall = (time.perf_counter() - t0) / B
        diags = []
        for i in range(B):
            st = status[i]
            if bool(keep[i]):
                st = "failed" if st == "failed" or not math.isfinite(float(final_loss[i])) else "kept_initial"
            diags.append(QueryDiagnostics(float(initial_loss[i]), float(final_loss[i]), int(iters[i]), wall, st))
        return RefineResult(out, init.double().cpu().numpy(), diags)

    def _refine_apr_one(self, image, K_np, apr) -> RefineResult:
        """NeFeS's default target: Adam on a per-query copy of the APR's weights."""
        cfg = self.config
        t0 = time.perf_counter()
        H, W = image.shape[1:3]
        dev = self.device
        K = torch.as_tensor(K_np, dtype=torch.float32, device=dev)
        target = self.encode_queries(image)
        stride = self.stride()
        local = copy.deepcopy(apr).to(dev).eval()  # BN statistics frozen; only this copy changes
        from fastnefes.apr.model import prepare_images

        x = prepare_images(image, local.image_hw).to(dev)
        opt = torch.optim.Adam(local.parameters(), lr=cfg.lr_apr)
        with torch.no_grad():
            init = local(x).float()
            initial_loss = self._loss_at(K, init, target, H, W, stride)
        status, its = "max_iters", 0
        best = (float(initial_loss[0]), init)
        for it in range(cfg.iters):
            for g in opt.param_groups:
                g["lr"] = cfg.lr_apr * _lr_scale(cfg, it)
            factor = cfg.coarse_factor if it < cfg.coarse_iters else 1
            pose = local(x).float()
            loss = self._loss_at(K, pose, target, H, W, stride, factor)
            its += 1
            if not torch.isfinite(loss).all():
                status = "failed"
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            final = local(x).float()
            final_loss = self._loss_at(K, final, target, H, W, stride)
        fl = float(final_loss[0])
        keep = status == "failed" or not math.isfinite(fl) or not torch.isfinite(final).all() or (cfg.verify and fl >= best[0])
        if keep and status != "failed":
            status = "kept_initial"
        pose = (init if keep else final).double().cpu().numpy()
        diag = QueryDiagnostics(best[0], fl, its, time.perf_counter() - t0, status)
        return RefineResult(pose, init.double().cpu().numpy(), [diag])
