"""FeatureFieldModel: everything a trained run holds, in one nn.Module.

Geometry field + colour / feature / transient heads + ACT + Feature Fusion + the 2D encoder G +
the occupancy grid + the scene normalisation (dataset frame <-> the hash grid's unit cube).
Its configuration is plain data (ModelConfig, saved in the run's config.json); every tensor is
in the state dict (saved as safetensors), except a distill extractor, which stays in its own
TorchScript file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fastnefes.errors import FastnefesError
from fastnefes.field.act import ExposureACT
from fastnefes.field.encoder import DistillEncoder, SSLEncoder
from fastnefes.field.fusion import FeatureFusion
from fastnefes.field.geometry import GeometryField
from fastnefes.field.heads import ColorHead, FeatureHead, TransientHead
from fastnefes.field.nerf_mlp import NeRFGeometryField
from fastnefes.field.space import CONTRACTED_CONE_ANGLE, CONTRACTED_OCC_LEVELS, SPACES
from fastnefes.ops.hashgrid import HashGridConfig
from fastnefes.ops.occgrid import OccupancyGrid

ENCODER_MODES = ("ssl", "distill")
ARCHS = ("hash", "mlp")
BACKGROUNDS = ("learned", "white", "black")


def _default_grid() -> dict[str, Any]:
    # CPU-sized: 8 levels x 2 features, 2^17 entries, finest ~ 16 * 1.6^7 = 430 cells per unit.
    return asdict(HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=17,
                                 base_resolution=16, per_level_scale=1.6))


@dataclass
class ModelConfig:
    """Architecture and rendering settings of a feature field (plain data, JSON-serialisable)."""

    # "hash": hash grid + small MLP, occupancy-grid marching (fastnefes). "mlp": NeFeS's original
    # sampler, the baseline of `fastnefes bench`: frequency encoding, coarse + fine 8x128 MLPs,
    # coarse_samples stratified + fine_samples importance samples per ray, no occupancy grid.
    arch: str = "hash"
    grid: dict[str, Any] = field(default_factory=_default_grid)  # HashGridConfig fields (arch hash)
    mlp_freqs: int = 10
    mlp_width: int = 128
    mlp_depth: int = 8
    mlp_skip: int = 4
    coarse_samples: int = 64
    fine_samples: int = 64
    geo_hidden: int = 64
    geo_layers: int = 1
    geo_feat_dim: int = 15
    density_bias: float = -1.0  # raw density offset: exp(bias) is the initial density (unit-cube units)
    color_hidden: int = 64
    color_layers: int = 2
    sh_degree: int = 4
    # 16 on CPU: compositing, fusion and the encoder all scale with D, and a 16-d contrastive
    # embedding already matches pixels across views (tests/test_encoder.py); NeFeS used 128.
    feature_dim: int = 16
    feature_hidden: int = 64
    feature_layers: int = 1
    feature_grad_to_geometry: bool = False  # feature losses shape the hash grid too
    detach_feature_weights: bool = True  # NeFeS: features composite with detached weights
    transient: bool = True
    transient_embed_dim: int = 16
    transient_hidden: int = 32  # one hidden layer: the transient head is evaluated at every sample
    transient_layers: int = 1
    beta_min: float = 0.1
    act: bool = True
    act_bins: int = 10
    fusion_width: int = 32
    fusion_layers: int = 3
    encoder: str = "ssl"  # "ssl" | "distill"
    encoder_stride: int = 8
    encoder_width: int = 32
    extractor_path: Optional[str] = None  # distill: TorchScript file (copied into the run dir)
    extractor_sha256: Optional[str] = None
    # Scene parametrisation (fastnefes.field.space): "auto" takes the one the scene
    # normalisation chose from the data (resolved when training starts and saved so), or
    # "bounded" / "contracted".
    space: str = "auto"
    # Raise the grid's per_level_scale (up to MAX_PER_LEVEL_SCALE, never lower) so the finest
    # level's cells are about one pixel's footprint at the cameras' typical distance (resolved
    # when training starts and saved so; fastnefes.field.resolution).
    grid_from_pixels: bool = False
    occ_resolution: int = 64
    occ_levels: int = 1  # the contracted space uses CONTRACTED_OCC_LEVELS
    march_steps: int = 256  # marching step = sqrt(3) / march_steps in the unit cube
    cone_angle: float = 0.0  # steps grow as t * cone_angle beyond that (contracted space: 1/256)
    # Density pre-pass over the marched samples that drops those behind surfaces (transmittance
    # < early_stop_eps) or nearly transparent (alpha < alpha_thre), as nerfacc's sigma_fn. With
    # alpha_thre = 0 it changes no rendered value and runs only while it pays for itself
    # (fastnefes.ops.occgrid.culling).
    cull_samples: bool = True
    alpha_thre: float = 0.0
    early_stop_eps: float = 1e-4
    background: str = "learned"
    n_images: int = 1  # training images (transient embeddings)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise FastnefesError(f"model config: arch={self.arch!r}, expected one of {ARCHS}")
        if self.encoder not in ENCODER_MODES:
            raise FastnefesError(f"model config: encoder={self.encoder!r}, expected one of {ENCODER_MODES}")
        if self.space not in ("auto", *SPACES):
            raise FastnefesError(f"model config: space={self.space!r}, expected auto or one of {SPACES}")
        if self.background not in BACKGROUNDS:
            raise FastnefesError(f"model config: background={self.background!r}, expected one of {BACKGROUNDS}")
        if not (isinstance(self.feature_dim, int) and self.feature_dim >= 1):
            raise FastnefesError(f"model config: feature_dim={self.feature_dim!r}, expected a positive integer")
        if not isinstance(self.grid, dict):
            raise FastnefesError(f"model config: grid={self.grid!r}, expected a JSON object of hash grid settings")
        # Keys left out keep the model's defaults (a partial {"log2_hashmap_size": 19} is complete).
        self.grid = asdict(HashGridConfig.from_dict({**_default_grid(), **self.grid}))  # validates

    @property
    def render_step_size(self) -> float:
        return math.sqrt(3.0) / self.march_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve_space(self, chosen: str) -> None:
        """Settle space "auto" to `chosen` (the normalisation's choice); a contracted space gets
        its multi-level occupancy grid and cone angle. Idempotent."""
        if self.space == "auto":
            self.space = chosen
        if self.space == "contracted":
            self.occ_levels = max(self.occ_levels, CONTRACTED_OCC_LEVELS)
            self.cone_angle = self.cone_angle or CONTRACTED_CONE_ANGLE

    def resolve_grid(self, finest: float) -> None:
        """With grid_from_pixels, raise per_level_scale so the finest level has about `finest`
        cells across the unit cube (fastnefes.field.resolution); then switch the option off, so a
        saved config says what it trained with and resolving again changes nothing."""
        if not self.grid_from_pixels:
            return
        from fastnefes.field.resolution import per_level_scale_for

        grid = dict(self.grid)
        grid["per_level_scale"] = per_level_scale_for(finest, grid["base_resolution"], grid["n_levels"],
                                                      floor=grid["per_level_scale"])
        self.grid, self.grid_from_pixels = grid, False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FastnefesError(f"model config: unknown keys {unknown}")
        return cls(**d)


class FeatureFieldModel(nn.Module):
    """The trained scene. Positions in the dataset frame go through `to_unit` first.

    Attributes used by the refiner: `feature_dim`, `feature_stride`, `normalization`,
    `encode_images(images) -> [B, D, H // s, W // s]`.
    """

    def __init__(self, config: ModelConfig, normalization, extractor: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.config = config
        self.geometry = self._geometry_field(config)
        self.color = ColorHead(config.geo_feat_dim, config.color_hidden, config.color_layers, config.sh_degree)
        # NeRF's coarse network: its own geometry and colour, trained on RGB, guides the fine samples.
        self.coarse = (nn.ModuleDict({"geometry": self._geometry_field(config),
                                      "color": ColorHead(config.geo_feat_dim, config.color_hidden, config.color_layers,
                                                         config.sh_degree)})
                       if config.arch == "mlp" else None)
        enc_dims = self.geometry.n_output_dims
        self.feature = FeatureHead(enc_dims, config.geo_feat_dim, config.feature_dim,
                                   config.feature_hidden, config.feature_layers)
        self.transient = (TransientHead(enc_dims, config.n_images, config.transient_embed_dim,
                                        config.transient_hidden, config.transient_layers) if config.transient else None)
        self.act = ExposureACT(config.act_bins) if config.act else None
        self.fusion = FeatureFusion(config.feature_dim, config.fusion_width, config.fusion_layers)
        if config.encoder == "ssl":
            self.encoder: nn.Module = SSLEncoder(config.feature_dim, config.encoder_stride, config.encoder_width)
        else:
            if extractor is None:
                raise FastnefesError("distill mode needs a TorchScript extractor (--extractor PATH.pt)")
            self.encoder = DistillEncoder(extractor, config.feature_dim, config.encoder_stride)
        self.occupancy = OccupancyGrid((0, 0, 0, 1, 1, 1), config.occ_resolution, config.occ_levels)
        self.background_logit = nn.Parameter(torch.zeros(3), requires_grad=config.background == "learned")
        if config.background != "learned":
            with torch.no_grad():
                self.background_logit.fill_(20.0 if config.background == "white" else -20.0)
        self.normalization = normalization
        # The normalisation as buffers, so it follows .to(device) and lands in the state dict.
        self.register_buffer("norm_center", torch.as_tensor(normalization.center, dtype=torch.float32).reshape(3))
        self.register_buffer("norm_scale", torch.as_tensor(float(normalization.scale), dtype=torch.float32))

    @staticmethod
    def _geometry_field(config: ModelConfig) -> nn.Module:
        if config.arch == "mlp":
            return NeRFGeometryField(config.mlp_freqs, config.mlp_width, config.mlp_depth, config.mlp_skip,
                                     config.geo_feat_dim, config.density_bias)
        return GeometryField(HashGridConfig.from_dict(config.grid), config.geo_hidden, config.geo_layers,
                             config.geo_feat_dim, config.density_bias, contract=config.space == "contracted")

    # ---- properties the refiner and the trainer use ------------------------------------
    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def feature_stride(self) -> int:
        return int(self.encoder.stride)

    @property
    def render_step_size(self) -> float:
        return self.config.render_step_size

    @property
    def device(self) -> torch.device:
        return self.norm_center.device

    def background(self) -> Tensor:
        """RGB [3] behind the scene."""
        return torch.sigmoid(self.background_logit)

    # ---- frames -----------------------------------------------------------------------------
    def to_unit(self, x: Tensor) -> Tensor:
        """Dataset-frame points [...,3] -> unit-cube points (differentiable)."""
        return (x - self.norm_center) * self.norm_scale + 0.5

    def from_unit(self, x: Tensor) -> Tensor:
        return (x - 0.5) / self.norm_scale + self.norm_center

    # ---- field queries (unit-cube positions) ---------------------------------------------
    def density(self, x: Tensor) -> Tensor:
        """x [N,3] unit cube -> density [N] (unit-cube units)."""
        return self.geometry.density(x)

    def occupancy_value(self, x: Tensor) -> Tensor:
        """What the occupancy grid thresholds: the opacity of one marching step."""
        return self.density(x) * self.render_step_size

    # ---- 2D encoder -------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 [B,H,W,3] or float [B,3,H,W] in [0,1] -> features [B, D, H // s, W // s]."""
        return self.encoder(images.to(self.device))
