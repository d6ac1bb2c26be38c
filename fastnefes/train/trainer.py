"""Progressive NeFeS training of a feature field on one scene.

Stage 1 "photometric": RGB through transient + ACT, uncertainty-weighted (NeRF-W).
Stage 2 "features": + the feature loss: in ssl mode the contrastive loss that trains the field's
    feature head and the 2D encoder together (+ anti-collapse terms); in distill mode L1 + cosine
    to the frozen extractor.
Stage 3 "fusion": + patches rendered at slightly jittered training poses through the Feature
    Fusion module; their targets are the encoder's features of the (unjittered) training image
    at the points the rendered depth reprojects to, so fused features stay right near, not only
    at, the training poses.
The occupancy grid is updated throughout. Runs are deterministic for a seed on CPU, and a run
resumed from a checkpoint reproduces the uninterrupted one (see fastnefes.train.run).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.field.encoder import sample_feature_map
from fastnefes.field.model import FeatureFieldModel
from fastnefes.render import render_image, render_pixels, render_rays
from fastnefes.ops.occgrid.culling import CULL_COST
from fastnefes.train.config import STAGES, TrainConfig
from fastnefes.train.losses import (contrastive_loss, depth_loss, distill_loss, photometric_loss, psnr,
                                    variance_covariance_loss)
from fastnefes.train.sampler import ImageSet, RaySampler, backproject, reproject


class TrainingDiverged(FastnefesError):
    """A loss became NaN / inf: names the step and stage; the last checkpoint is kept."""


# Parameter groups: (name, first stage index where it trains, learning-rate field of TrainConfig).
GROUPS = (("grid", 0, "lr_grid"), ("mlp", 0, "lr_mlp"), ("act", 0, "lr_act"), ("feature", 1, "lr_feature"),
          ("encoder", 1, "lr_encoder"), ("fusion", 2, "lr_fusion"))


def parameter_groups(model: FeatureFieldModel) -> dict[str, list[torch.nn.Parameter]]:
    hashed = model.config.arch == "hash"
    groups: dict[str, list] = {
        "grid": [model.geometry.encoding.params] if hashed else [],
        "mlp": [*(model.geometry.mlp.parameters() if hashed else model.geometry.parameters()),
                *(model.coarse.parameters() if model.coarse is not None else []),
                *model.color.parameters(), model.background_logit,
                *(model.transient.parameters() if model.transient is not None else [])],
        "act": list(model.act.parameters()) if model.act is not None else [],
        "feature": list(model.feature.parameters()),
        "encoder": [p for p in model.encoder.parameters() if p.requires_grad],
        "fusion": list(model.fusion.parameters()),
    }
    return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}


def build_optimizer(model: FeatureFieldModel, cfg: TrainConfig) -> torch.optim.Adam:
    groups = parameter_groups(model)
    param_groups = []
    for name, _, lr_field in GROUPS:
        wd = cfg.weight_decay_mlp if name in ("mlp", "feature") else 0.0
        param_groups.append({"params": groups[name], "lr": getattr(cfg, lr_field), "weight_decay": wd, "name": name})
    # eps 1e-15 for the hash table (instant-ngp): rarely touched entries still move.
    return fused_adam(param_groups, betas=(0.9, 0.99), eps=1e-15)


def fused_adam(params, **settings) -> torch.optim.Adam:
    """Adam as one fused kernel over every parameter where this torch has one for their device
    (CPU since torch 2.4; about 8x faster than the default multi-tensor Adam on the 1.5M
    parameters of the default field on a CPU), else the default implementation (the same update,
    rounded differently)."""
    try:
        return torch.optim.Adam(params, fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these tensors here
        return torch.optim.Adam(params, **settings)


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda[:n]' -> torch.device (FastnefesError when CUDA is asked for and absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastnefesError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise FastnefesError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


@dataclass
class TrainState:
    """Progress that a checkpoint restores (everything else is tensors)."""

    step: int = 0  # steps completed
    n_rays: int = 0  # photometric rays of the next step (adapted to the sample budget)
    elapsed_s: float = 0.0  # wall time of the budget so far: setup, steps, validation and checkpoints
    stage_steps: list[int] = field(default_factory=lambda: [0, 0, 0])
    history: list[dict] = field(default_factory=list)  # logged training losses
    val: list[dict] = field(default_factory=list)  # validation results
    culling: dict = field(default_factory=dict)  # the occupancy grid's CullSchedule (a resumed run culls as the uninterrupted one)
    keypoint_depths: int = 0  # sparse depth targets triangulated for keypoint_depth_weight

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    """Owns model, optimiser, sampler and progress; `run()` trains to the budget."""

    def __init__(self, scene: Scene, config: TrainConfig, model: FeatureFieldModel,
                 progress: Optional[Callable[[dict], None]] = None) -> None:
        self.scene, self.cfg, self.model = scene, config, model
        self.device = model.device
        self.progress = progress
        self.images = ImageSet(scene, scene.split("train"), self.device, config.model.act_bins,
                               with_depth=config.depth_weight > 0)
        self.state = TrainState(n_rays=config.batch_rays)
        self.depth_weight = config.depth_weight
        if config.supervises_keypoint_depth:
            from fastnefes.data.triangulate import keypoint_depths

            found = keypoint_depths(scene, self.images.indices, center=model.normalization.center)
            self.state.keypoint_depths = self.images.set_keypoints(found)
            self.depth_weight = config.keypoint_depth_weight
        self.sampler = RaySampler(self.images, config.seed)
        self.optimizer = build_optimizer(model, config)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.closing_s = {"val": 0.0, "checkpoint": 0.0}  # the last of each: what the budget's end still costs
        self.val_indices = (scene.split("val") or scene.split("test"))[: max(config.val_images, 0)]
        self.amp = config.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if config.model.background == "learned":
            with torch.no_grad():  # start from the images' typical border colour (white for renders of objects)
                border = self.images.border_colour().clamp(0.02, 0.98)
                model.background_logit.copy_(torch.logit(border))
        # The grid lives in the unit cube: cameras go there too (a uniform scale leaves K as is).
        c2w_unit = self.images.c2w.clone()
        c2w_unit[:, :3, 3] = model.to_unit(c2w_unit[:, :3, 3])
        height, width = int(self.images.hw[0, 0]), int(self.images.hw[0, 1])
        grid = self.model.occupancy
        self.use_occupancy = config.model.arch == "hash"
        grid.mark_invisible_cells(self.images.K, c2w_unit, width, height,
                                  near_plane=float(model.normalization.near * model.normalization.scale))
        # Every visible cell starts occupied: thresholding the untrained (uniform) density would
        # empty a random half of the grid, walls included, and unsampled cells never learn.
        grid.binaries.copy_((grid.occs >= 0).view(grid.binaries.shape))

    # ---- schedule ------------------------------------------------------------------------
    def progress_fraction(self) -> float:
        if self.cfg.minutes is not None:
            return min(self.state.elapsed_s / (60.0 * self.cfg.minutes), 1.0)
        return min(self.state.step / self.cfg.steps, 1.0)

    def stage_starts(self) -> list[float]:
        """Budget fraction at which each stage starts."""
        total = sum(self.cfg.stage_fractions)
        return [sum(self.cfg.stage_fractions[:k]) / total for k in range(3)]

    def stage_at(self, fraction: float) -> int:
        if self.cfg.minutes is None:  # exact integer boundaries for a step budget
            ends = list(accumulate(self.cfg.stage_steps()))
            return next((k for k, end in enumerate(ends) if self.state.step < end), 2)
        return max(k for k, start in enumerate(self.stage_starts()) if fraction >= start and
                   (k == 0 or self.cfg.stage_fractions[k] > 0))

    def set_learning_rates(self, fraction: float) -> None:
        """Each group decays exponentially to lr_decay x from the start of its first stage to the end."""
        starts = self.stage_starts()
        for group, base, (_, first_stage, _) in zip(self.optimizer.param_groups, self.base_lrs, GROUPS):
            start = starts[first_stage]
            local = min(max((fraction - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
            group["lr"] = base * self.cfg.lr_decay**local

    def done(self) -> bool:
        if self.cfg.minutes is not None:  # at least one step; leave room for the closing validation and checkpoint
            return self.state.step > 0 and self.state.elapsed_s + sum(self.closing_s.values()) >= 60.0 * self.cfg.minutes
        return self.progress_fraction() >= 1.0

    # ---- one step --------------------------------------------------------------------------
    def _photometric(self, n_rays: int, image_ids: Optional[Tensor] = None, with_features: bool = False):
        batch = self.sampler.rays(n_rays, image_ids, self.cfg.keypoint_ray_fraction)
        hist = self.images.histograms[batch.image_ids]
        out = render_rays(self.model, batch.origins, batch.dirs, image_ids=batch.image_ids, act_histograms=hist,
                          with_features=with_features, training=True, with_distortion=self.cfg.distortion_weight > 0)
        loss = photometric_loss(out["rgb_train"], batch.rgb, out.get("beta"), out.get("transient_density"),
                                self.cfg.transient_reg)
        if batch.depth is not None:
            loss = loss + self.depth_weight * depth_loss(out["depth"], batch.depth)
        if "distortion" in out:
            loss = loss + self.cfg.distortion_weight * out["distortion"]
        if "rgb_coarse" in out:  # --arch mlp: NeRF trains its coarse network on plain RGB
            loss = loss + photometric_loss(out["rgb_coarse"], batch.rgb)
        if self.model.act is not None and self.cfg.act_anchor_weight > 0:
            # ACT o static colour has a global gauge freedom; pinning the mean transform over the
            # training images to the identity keeps the static colour at the average exposure.
            K, b = self.model.act.transform(self.images.histograms)
            anchor = (K.mean(0) - torch.eye(3, device=K.device)).pow(2).sum() + b.mean(0).pow(2).sum()
            loss = loss + self.cfg.act_anchor_weight * anchor
        return loss, out, batch

    def _feature_terms(self, rendered: Tensor, target: Tensor, points_unit: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(total feature loss, its matching term: InfoNCE in ssl mode, L1 + cosine in distill mode)."""
        cfg = self.cfg
        if self.model.config.encoder == "distill":
            loss = distill_loss(rendered, target)
            return loss, loss
        match = contrastive_loss(rendered, target, points_unit, cfg.positive_radius, cfg.contrastive_temperature)
        var_r, cov_r = variance_covariance_loss(rendered)
        var_e, cov_e = variance_covariance_loss(target)
        return match + cfg.variance_weight * (var_r + var_e) + cfg.covariance_weight * (cov_r + cov_e), match

    def _stage_features(self) -> tuple[Tensor, dict]:
        cfg = self.cfg
        ids = self.sampler.choose_images(cfg.feature_images)
        n_rays = max(self.state.n_rays - self.state.n_rays % ids.shape[0], ids.shape[0])
        loss_rgb, out, batch = self._photometric(n_rays, ids, with_features=True)
        per_image = batch.pixels.shape[0] // ids.shape[0]
        take = max(1, min(per_image, cfg.contrastive_pixels // ids.shape[0]))
        sel = (torch.arange(ids.shape[0], device=self.device)[:, None] * per_image
               + torch.arange(take, device=self.device)).reshape(-1)
        train_encoder = self.model.config.encoder == "ssl"
        with nullcontext() if train_encoder else torch.no_grad():
            maps = self.model.encode_images(self.images.stack(ids))
        target = sample_feature_map(maps, batch.pixels[sel].view(ids.shape[0], take, 2), self.model.feature_stride)
        points = self.model.to_unit(batch.origins[sel] + batch.dirs[sel] * out["depth"][sel, None]).detach()
        loss_feat, match = self._feature_terms(out["features"][sel], target.reshape(-1, target.shape[-1]), points)
        return loss_rgb + cfg.feature_weight * loss_feat, {"rgb": loss_rgb, "feature": loss_feat, "match": match,
                                                           "out": out, "batch": batch}

    def _stage_fusion(self) -> tuple[Tensor, dict]:
        cfg, model = self.cfg, self.model
        stride, per = model.feature_stride, cfg.patches_per_image
        ids = self.sampler.choose_images(cfg.fusion_images)
        with torch.no_grad():
            maps = model.encode_images(self.images.stack(ids)).repeat_interleave(per, 0)
        pixels = self.sampler.patches(ids, per, cfg.patch_size, stride)
        c2w = self.images.c2w[ids]
        jittered = self.sampler.jitter(c2w, cfg.jitter_rot_deg, cfg.jitter_trans / float(model.normalization.scale))
        c2w, jittered = c2w.repeat_interleave(per, 0), jittered.repeat_interleave(per, 0)
        K = self.images.K[ids].repeat_interleave(per, 0)
        out = render_pixels(model, K, jittered, pixels, fused=True)
        with torch.no_grad():
            depth = out["depth"]
            uv, z = reproject(pixels, depth, K, jittered, c2w)
            hw = self.images.hw[ids].repeat_interleave(per, 0)[:, None, None].flip(-1).float()  # (W, H)
            valid = ((z > 0) & (out["opacity"] > cfg.fusion_min_opacity) & (uv >= 0).all(-1) & (uv < hw).all(-1)).flatten(1, 2)
            target = sample_feature_map(maps, uv.flatten(1, 2), stride)[valid]  # [M,D]
            points = model.to_unit(backproject(pixels, depth, K, jittered)).flatten(1, 2)[valid]
        fused = out["fused"].flatten(1, 2)[valid]
        raw = out["features"].flatten(1, 2)[valid]
        loss_rgb, rgb_out, batch = self._photometric(max(1, int(self.state.n_rays * cfg.fusion_rgb_fraction)))
        if target.shape[0] < 8:  # nothing usable hit (degenerate patches): photometric only
            return loss_rgb, {"rgb": loss_rgb, "out": rgb_out, "batch": batch}
        loss_fused, match = self._feature_terms(fused, target, points)
        loss_raw, _ = self._feature_terms(raw, target, points)
        loss = loss_rgb + cfg.fusion_weight * loss_fused + cfg.feature_weight * loss_raw
        return loss, {"rgb": loss_rgb, "feature": loss_raw, "fusion": loss_fused, "match": match, "out": rgb_out,
                      "batch": batch}

    def step(self) -> dict:
        """One optimisation step of the current stage; returns logged scalars (tensors)."""
        cfg, model = self.cfg, self.model
        fraction = self.progress_fraction()
        stage = self.stage_at(fraction)
        self.set_learning_rates(fraction)
        model.train()
        if self.use_occupancy and self.state.step >= cfg.occ_start_step:
            step = self.state.step - cfg.occ_start_step
            model.occupancy.update_every_n_steps(step, model.occupancy_value, occ_thre=cfg.occ_threshold,
                                                 ema_decay=cfg.occ_ema_decay, warmup_steps=cfg.occ_warmup_steps,
                                                 n=cfg.occ_update_every)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext():
            if stage == 0:
                loss, out, batch = self._photometric(self.state.n_rays)
                parts = {"rgb": loss, "out": out, "batch": batch}
            elif stage == 1:
                loss, parts = self._stage_features()
            else:
                loss, parts = self._stage_fusion()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out, batch = parts.pop("out"), parts.pop("batch")
        logged = {k: v.detach() for k, v in parts.items()}
        logged["loss"] = loss.detach()
        logged["psnr"] = psnr(out["rgb_train"].detach(), batch.rgb)
        logged["rays"] = batch.rgb.shape[0]
        logged["stage"] = stage
        n_samples, n_candidates = int(out["n_samples"]), int(out["n_candidates"])
        logged["samples"] = n_samples + n_candidates
        self._adapt_batch(batch.rgb.shape[0], n_samples, n_candidates)
        return logged

    def _adapt_batch(self, n_rays: int, n_samples: int, n_candidates: int) -> None:
        """Next step's ray count so that it costs about cfg.batch_samples trained samples (a
        culling pre-pass sample, forward only, counts as CULL_COST of one)."""
        cfg = self.cfg
        if cfg.batch_samples <= 0 or n_rays <= 0:
            return
        per_ray = max((n_samples + CULL_COST * n_candidates) / n_rays, 1.0)
        target = int(cfg.batch_samples / per_ray)
        self.state.n_rays = int(min(max(target, cfg.min_batch_rays), cfg.max_batch_rays))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, stop_at_step: Optional[int] = None, checkpoint: Optional[Callable[[], None]] = None) -> None:
        """Step until the budget (or stop_at_step) is reached; log, validate and call `checkpoint`
        every checkpoint_every steps on the way (after checking the weights are finite).

        Each step already synchronises with the device once (the adaptive batch reads the
        sample count), so losses are checked for NaN after every step at no extra cost.
        """
        cfg, state = self.cfg, self.state
        while not self.done() and (stop_at_step is None or state.step < stop_at_step):
            t0 = time.perf_counter()
            logged = self.step()
            values = {k: float(logged[k]) for k in ("loss", "rgb", "feature", "fusion", "match", "psnr") if k in logged}
            dt = time.perf_counter() - t0
            check_finite(values, state.step, logged["stage"])
            state.step += 1
            state.elapsed_s += dt
            state.stage_steps[logged["stage"]] += 1
            row = {"step": state.step, "stage": logged["stage"], "time_s": round(state.elapsed_s, 3), **values}
            if state.step % cfg.log_every == 0 or self.done():
                state.history.append(row)
            if self.progress is not None:
                self.progress({"event": "step", **row, "fraction": self.progress_fraction(), "rays_per_s": logged["rays"] / dt,
                               "rays": logged["rays"], "samples": logged["samples"], "step_s": dt})
            # A time budget is wall time: validation and checkpoints count against it too.
            if cfg.val_every > 0 and state.step % cfg.val_every == 0 and self.val_indices:
                self.closing_s["val"] = self._timed(self._validate)
            if checkpoint is not None and cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0 and not self.done():
                self.check_weights()
                self.closing_s["checkpoint"] = self._timed(checkpoint)
        if self.done() and self.val_indices and (not state.val or state.val[-1]["step"] != state.step):
            self._timed(self._validate)

    def _timed(self, action: Callable[[], None]) -> float:
        """Run action, add its wall time to the budget's elapsed time, return it."""
        start = time.perf_counter()
        action()
        seconds = time.perf_counter() - start
        self.state.elapsed_s += seconds
        return seconds

    def _validate(self) -> None:
        result = validate(self.model, self.scene, self.val_indices, self.cfg.val_stride)
        self.state.val.append({"step": self.state.step, **result})
        if self.progress is not None:
            self.progress({"event": "val", "step": self.state.step, **result})

    def check_weights(self) -> None:
        """Raise TrainingDiverged if any weight is NaN / inf (never checkpoint a broken model)."""
        for p in self.model.parameters():
            if not bool(torch.isfinite(p).all()):
                raise TrainingDiverged(f"training diverged: non-finite weights at step {self.state.step}; the last checkpoint is kept")

def check_finite(values: dict[str, float], step: int, stage: int) -> None:
    """Raise TrainingDiverged naming the step and stage when a logged loss is not finite."""
    for key, v in values.items():
        if not math.isfinite(v):
            raise TrainingDiverged(f"training diverged: {key} = {v} at step {step} "
                                   f"(stage {stage + 1} '{STAGES[stage]}'); the last checkpoint is kept")


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_views(model: FeatureFieldModel, scene: Scene, indices: list[int], stride: int = 1,
                   chunk: int = 1 << 15) -> Iterator[dict]:
    """Render scene views with the model (eval mode) and score them.

    Yields per view: index, name, 'rgb' / 'gt' float [h,w,3], 'rgb_act' (ACT from the view's
    own luma histogram, if the model has ACT), 'depth' [h,w], 'features' [h,w,D], 'psnr',
    'psnr_act'. With stride > 1 the ground truth is the image averaged over s x s blocks.
    """
    from fastnefes.field.act import luma_histogram

    was_training = model.training
    model.eval()
    try:
        for i in indices:
            image = scene.image(i)
            h, w = image.shape[:2]
            K = torch.as_tensor(scene.K[i], dtype=torch.float32)[None]
            c2w = torch.as_tensor(scene.c2w[i], dtype=torch.float32)[None]
            hist = luma_histogram(image, model.config.act_bins)[None]
            out = render_image(model, K, c2w, h, w, stride=stride, fused=False, chunk=chunk, act_histograms=hist)
            gt = torch.from_numpy(image).float() / 255.0
            if stride > 1:  # the s x s block average is centred on the strided ray, like the render
                gt = torch.nn.functional.avg_pool2d(gt.permute(2, 0, 1)[None], stride)[0].permute(1, 2, 0)
            view = {"index": i, "name": scene.names[i], "gt": gt, "rgb": out["rgb"][0].cpu(), "depth": out["depth"][0].cpu(),
                    "features": out["features"][0].cpu()}
            view["psnr"] = float(psnr(view["rgb"], gt))
            if "rgb_act" in out:
                view["rgb_act"] = out["rgb_act"][0].cpu()
                view["psnr_act"] = float(psnr(view["rgb_act"], gt))
            yield view
    finally:
        model.train(was_training)


def validate(model: FeatureFieldModel, scene: Scene, indices: list[int], stride: int) -> dict:
    """Mean PSNR (and PSNR with ACT) over views."""
    views = [{k: v for k, v in view.items() if k in ("psnr", "psnr_act")}
             for view in evaluate_views(model, scene, indices, stride)]
    out = {"psnr": sum(v["psnr"] for v in views) / max(len(views), 1), "views": len(views)}
    if views and "psnr_act" in views[0]:
        out["psnr_act"] = sum(v["psnr_act"] for v in views) / len(views)
    return out
