"""Training settings as plain data (saved in the run directory's config.json).

Defaults are sized for a 2-core CPU: an 8-level 2^17 hash grid, 64^3 occupancy grid, 16-d
features and a budget of ~32k samples a step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from fastnefes.errors import FastnefesError
from fastnefes.field.model import ModelConfig

STAGES = ("photometric", "features", "fusion")

# What `--arch` changes besides ModelConfig.arch ('model': ModelConfig fields). The mlp baseline
# trains as NeFeS's code does: Adam 5e-4 on the MLPs, a fixed 1024 rays a step (every ray costs
# the same 64 + 64 samples), and no background colour (NeFeS composites over black, as NeRF-W):
# with a learned background the slow MLP first explains the images by the background and its
# density collapses to zero, where exp's gradient vanishes (measured on the room: val PSNR stuck
# at 17.0 dB for 15 minutes; over black, 19.9 dB after 600 steps of 256 rays).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "hash": {},
    "mlp": {"lr_mlp": 5e-4, "batch_rays": 1024, "batch_samples": 0, "model": {"background": "black"}},
}


@dataclass
class TrainConfig:
    """Progressive NeFeS training: photometric -> + features (+ encoder) -> + fusion."""

    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    device: str = "cpu"
    mixed_precision: bool = True  # CUDA only (fp16 autocast + grad scaling); ignored on CPU
    # Budget: a step count, split over the stages by `stage_fractions`, or wall minutes (the
    # stages then switch at those fractions of the time).
    steps: int = 3000
    minutes: Optional[float] = None
    stage_fractions: tuple[float, float, float] = (0.6, 0.25, 0.15)
    # Rays per step (stages 1-2): start at batch_rays, then adapt so a step marches about
    # batch_samples samples (instant-ngp / nerfacc: fixed work per step while the occupancy grid
    # empties), within [min_batch_rays, max_batch_rays]. batch_samples = 0 keeps batch_rays.
    # Stage 2 draws them from `feature_images` images per step, as the encoder sees whole images.
    batch_rays: int = 1024
    batch_samples: int = 1 << 15
    min_batch_rays: int = 256
    max_batch_rays: int = 8192
    feature_images: int = 4
    contrastive_pixels: int = 512  # rays of the batch that also enter the contrastive / distill loss
    # Stage 3: patches of patch_size^2 feature cells (stride = encoder stride) from
    # fusion_images images, poses jittered by up to these amounts (unit-cube translation).
    fusion_images: int = 2
    patches_per_image: int = 2
    patch_size: int = 12
    jitter_rot_deg: float = 5.0
    jitter_trans: float = 0.03
    fusion_rgb_fraction: float = 0.5  # stage 3 keeps this share of the photometric rays
    fusion_min_opacity: float = 0.5  # patch pixels whose rendered depth is trusted for the target warp
    # Optimisation (Adam); every rate decays exponentially to lr_decay x over its active stages.
    lr_grid: float = 1e-2
    lr_mlp: float = 5e-3
    lr_feature: float = 3e-3
    lr_encoder: float = 3e-3
    lr_fusion: float = 1e-3
    lr_act: float = 1e-3
    lr_decay: float = 0.1
    weight_decay_mlp: float = 1e-6
    # Loss weights.
    # Depth supervision (relative L1 on rendered ray distance) for scenes with registered depth
    # maps (the synthetic room; off by default: 7-Scenes' Kinect depth is not registered to RGB).
    depth_weight: float = 0.0
    # mip-NeRF 360's distortion loss on the photometric rays (fastnefes.train.losses): gathers
    # each ray's weight at one surface instead of a fog around it.
    distortion_weight: float = 0.0
    # Sparse depth from the training images' own triangulated matches (DS-NeRF): relative L1
    # at this weight on keypoint_ray_fraction of each photometric batch, drawn at keypoints.
    # For scenes without registered depth maps; ignored where depth_weight supervises depth.
    keypoint_depth_weight: float = 0.0
    keypoint_ray_fraction: float = 0.125
    transient_reg: float = 0.01  # NeRF-W's mean transient density penalty
    act_anchor_weight: float = 1.0  # keeps the mean ACT over the training images at the identity
    feature_weight: float = 1.0  # stage 2+ contrastive (ssl) or distillation loss
    fusion_weight: float = 1.0  # stage 3 fused-feature loss
    contrastive_temperature: float = 0.1
    positive_radius: float = 0.01  # unit cube: rendered points closer than this are the same point
    variance_weight: float = 1.0  # anti-collapse: per-dimension std hinge
    covariance_weight: float = 1.0  # anti-collapse: off-diagonal covariance
    # Occupancy grid: all visible cells are marched until occ_start_step, so the first
    # threshold sees learned geometry; then EMA updates every occ_update_every steps.
    occ_start_step: int = 64
    occ_update_every: int = 16
    occ_warmup_steps: int = 256
    occ_threshold: float = 0.01
    occ_ema_decay: float = 0.95
    # Book-keeping.
    val_every: int = 500
    val_images: int = 2
    val_stride: int = 2
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        self.stage_fractions = tuple(float(f) for f in self.stage_fractions)  # type: ignore[assignment]
        if len(self.stage_fractions) != 3 or any(f < 0 for f in self.stage_fractions) or sum(self.stage_fractions) <= 0:
            raise FastnefesError(f"train config: stage_fractions={self.stage_fractions}, expected three non-negative numbers")
        if self.minutes is None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise FastnefesError(f"train config: steps={self.steps!r}, expected a positive integer")
        for name in ("depth_weight", "distortion_weight", "keypoint_depth_weight"):
            if not getattr(self, name) >= 0:
                raise FastnefesError(f"train config: {name}={getattr(self, name)!r}, expected a number >= 0")
        if not 0 < self.keypoint_ray_fraction < 1:
            raise FastnefesError(f"train config: keypoint_ray_fraction={self.keypoint_ray_fraction!r}, expected a number in (0, 1)")
        if self.minutes is not None and not self.minutes > 0:
            raise FastnefesError(f"train config: minutes={self.minutes!r}, expected a positive number")

    @property
    def supervises_keypoint_depth(self) -> bool:
        """Keypoint depth applies: asked for, and no depth maps supervise depth instead."""
        return self.keypoint_depth_weight > 0 and self.depth_weight == 0

    @classmethod
    def for_arch(cls, arch: str, **overrides: Any) -> "TrainConfig":
        """Defaults for `arch` ("hash" | "mlp", see ARCH_PRESETS), then `overrides`."""
        if arch not in ARCH_PRESETS:
            raise FastnefesError(f"--arch {arch!r}: expected one of {tuple(ARCH_PRESETS)}")
        preset = dict(ARCH_PRESETS[arch])
        model_preset = preset.pop("model", {})
        cfg = cls(**{**preset, **overrides})
        cfg.model.arch = arch
        for key, value in model_preset.items():
            setattr(cfg.model, key, value)
        return cfg

    def stage_steps(self) -> list[int]:
        """Steps per stage for a step budget (rounded so they sum to `steps`)."""
        total = sum(self.stage_fractions)
        bounds = [round(self.steps * sum(self.stage_fractions[: k + 1]) / total) for k in range(3)]
        return [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage_fractions"] = list(self.stage_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FastnefesError(f"train config: unknown keys {unknown}")
        return cls(**d)


# Named budgets (`fastnefes train --preset`), TrainConfig fields over the arch's defaults.
# quick: a first look in a few CPU minutes (a quarter of the samples per step, a third of the
# steps); default: the defaults above; long: twice the steps, for a field to refine hard queries
# against.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": 1000, "batch_samples": 1 << 13},
    "default": {},
    "long": {"steps": 6000},
}


def train_config(arch: str = "hash", preset: str = "default", overrides: Optional[dict[str, Any]] = None,
                 where: str = "train config", **fields_: Any) -> TrainConfig:
    """TrainConfig of `arch`'s defaults, then the named preset (TRAIN_PRESETS), then `overrides`
    (a JSON-style dict of TrainConfig fields; its "model" entry a dict of ModelConfig fields),
    then keyword fields. Unknown names are one-line errors naming `where`."""
    if preset not in TRAIN_PRESETS:
        raise FastnefesError(f"--preset {preset!r}: expected one of {', '.join(TRAIN_PRESETS)}")
    overrides = dict(overrides or {})
    if not all(isinstance(k, str) for k in overrides):
        raise FastnefesError(f"{where}: expected a JSON object of TrainConfig fields")
    model_over = overrides.pop("model", {})
    if not isinstance(model_over, dict):
        raise FastnefesError(f"{where}: \"model\" must be a JSON object of ModelConfig fields")
    names = {f.name for f in fields(TrainConfig)} - {"model"}
    unknown = sorted(set(overrides) - names) + [f"model.{k}" for k in sorted(set(model_over) - {f.name for f in fields(ModelConfig)})]
    if unknown:
        raise FastnefesError(f"{where}: unknown settings {unknown}")
    cfg = TrainConfig.for_arch(arch, **{**TRAIN_PRESETS[preset], **overrides, **fields_})
    if isinstance(model_over.get("grid"), dict):  # a partial grid changes only the keys it names
        model_over["grid"] = {**cfg.model.grid, **model_over["grid"]}
    cfg.model = ModelConfig.from_dict({**asdict(cfg.model), **model_over})  # validated as a whole
    return cfg

