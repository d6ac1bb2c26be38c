"""Refinement settings as plain data (saved beside results)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fastnefes.errors import FastnefesError


@dataclass
class RefineConfig:
    """Test-time refinement settings. Translation step sizes are in the field's unit cube, so
    they mean the same thing in every scene whatever its units."""

    target: str = "pose"  # "pose": an SE(3) increment per query; "apr": a per-query copy of the APR's weights
    # The feature phase's optimiser: "lm" (Levenberg-Marquardt on the feature residual, exact
    # Jacobians by forward tangents: fastnefes.refine.feature_gauss_newton), "direct" (direct
    # alignment of the query's map against keyframes rendered at the current pose, iters = the
    # keyframe renders: fastnefes.refine.direct_alignment) or "adam" (NeFeS: Adam on the loss's
    # gradient, with the step sizes below; preset "nefes").
    method: str = "direct"
    iters: int = 8  # feature-phase renders at most, coarse ones included (keyframes for "direct"; NeFeS: 50 Adam iterations)
    loss: str = "cosine"  # "cosine" (1 - mean cosine, NeFeS) or "robust" (Cauchy on unit features)
    signal: str = "features"  # "features" (fused feature field) or "rgb" (photometric, iNeRF-style)
    lr_rot: float = 0.01  # radians per Adam step, pose target (NeFeS: about 0.01)
    lr_trans: float = 0.005  # unit-cube units per Adam step (0.005 of the scene cube: 3 cm in a 6 m room)
    lr_apr: float = 1e-4  # Adam step for the APR-weights target
    lr_final_fraction: float = 0.05  # cosine decay of the step sizes to this fraction at the last iteration
    coarse_iters: int = 0  # first iterations at `coarse_factor` times coarser feature maps (Adam, LM)
    coarse_factor: int = 2
    # Compare the Feature Fusion module's output (NeFeS; needs every pixel of the map) or, False,
    # the composited features (per ray: then feature_rays can pick a subset).
    fused: bool = True
    # Unfused features only: rays per query, the most informative pixel (largest query-feature
    # gradient) of each block of the map; 0 = every pixel.
    feature_rays: int = 0
    # Surface-guided sampling (fastnefes.refine.surface) in the feature phase and the polish: a
    # phase's first render marches every ray, later renders take this many samples per ray in a
    # band around the surface it found, marching again where the camera moved more than
    # remarch_fraction of the band's half width. 0 = a full march at every render.
    band_samples: int = 0
    remarch_fraction: float = 0.5
    lm_feature_max_rot_deg: float = 5.0  # trust region of a feature-phase LM step: turn at most ...
    lm_feature_max_trans: float = 0.05  # ... and move at most (unit cube)
    stride: int = 0  # render stride in image pixels; 0 = the encoder's stride (NeFeS: 1/8 of the image)
    # > 0: the feature phase's stride doubles while its map has more pixels than this (a
    # 640x480 frame's 60x80 map becomes 30x40 at 1200); 0 = the stride above.
    max_feature_pixels: int = 1200
    tol_rot_deg: float = 0.005  # early stop when a step moves less than this ...
    tol_trans: float = 2e-5  # ... and less than this (unit cube) ...
    patience: int = 3  # ... for this many consecutive iterations
    check_every: int = 1  # how often convergence is checked (a host sync on GPU)
    verify: bool = True  # keep the initial pose when the feature phase made its loss worse
    # ... and (fastnefes.refine.verify) when the field's colour at the refined pose matches the
    # query's pixels worse (SSIM on the overlap) than at the initial pose; also gives each query
    # a confidence. verify_rays: pixels rendered per query and pose for it (0 = no pixel check).
    verify_rays: int = 1200
    verify_margin: float = 0.0  # SSIM the refined pose must gain over the initial one
    # ... and reach at least this fraction of the field's SSIM on its own training views (where
    # the model carries that reference: fastnefes.refine.verify.calibrate_pixel_check)
    verify_min_fraction: float = 0.6
    # Restarts of the feature phase from the initial pose (no coarse iterations, step sizes
    # halved per restart); each query keeps the run with the lowest feature loss. 0 = off: each
    # restart costs a whole feature phase.
    restarts: int = 0
    # Rotation search before the feature phase (fastnefes.refine.rotation_search): one render
    # widened by this fraction of the view on every side, the query correlated with every window
    # of it (at each roll angle), the camera turned to the best window where that lowers the
    # loss. 0 = off.
    search_pad: float = 0.3
    search_roll_deg: float = 10.0  # roll angles tried: search_roll_steps values in [-x, x] ...
    search_roll_steps: int = 5  # ... (1 = no roll)
    search_candidates: int = 4  # distinct turns rendered to pick from (the windows only rank them)
    # A query the search turned also runs the feature phase from its initial pose and keeps the
    # run with the lower loss: a turn can mimic a sideways offset. Off by default: it widened the
    # translation bounds on the room but lost one of 30 benchmark queries (README, step 2), and
    # costs a phase for each turned query.
    search_second_opinion: bool = False
    # Match-then-solve before the feature phase (fastnefes.refine.matching): rounds of mutual
    # nearest-neighbour feature matches + rendered depth -> PnP-RANSAC; 0 = off. Off by default:
    # on the room (30 queries, 10-30 cm / 5-10 deg) 2 rounds took the median from 0.90 to 2.9 cm
    # and sent some queries metres away, at poses whose coarse feature loss was lower still.
    match_rounds: int = 0
    match_min_inliers: int = 12
    match_reproj_factor: float = 1.5  # RANSAC threshold in feature cells (x stride pixels)
    # Photometric polish: features give the wide basin but pin the pose only to a few cm (their
    # maps are 1/8 resolution and smooth); a final RGB phase at a finer stride, started from the
    # feature result, pins it to millimetres. It is undone for a query whose RGB loss it raised.
    polish_iters: int = 6  # per pyramid level (keyframe renders for "direct"); 0 = no polish
    polish_stride: int = 1  # image pixels per rendered pixel in the (last) polish phase
    # A pyramid: levels at polish_stride * 2^(levels-1), ..., * 2, * 1. The coarsest level widens
    # RGB's basin; the last at every pixel (strides 8, 4, 2, 1) halved lego's median error.
    polish_levels: int = 4
    polish_method: str = "direct"  # "direct" (iters = keyframe renders), "lm" (Levenberg-Marquardt) or "adam"
    direct_iters: int = 8  # method "direct": Gauss-Newton iterations per keyframe (no renders)
    polish_lr_fraction: float = 0.3  # Adam polish: step sizes as a fraction of lr_rot / lr_trans
    # Rays fitted per query and polish level: where a level's grid has more pixels, at most this
    # many, the most textured pixel of each block of the grid (flat regions add rays, hardly any
    # J^T J), judged on every pixel of the finest grid at the end. 0 = every pixel.
    polish_rays: int = 1200
    # A polish that fits a subset of the rays is judged on every pixel of the finest grid, or,
    # > 0, on that grid coarsened (x2 at a time) to at most this many pixels.
    polish_judge_pixels: int = 1200
    # "grid": the judge above. "keyframes": a direct polish is judged by its own keyframe renders
    # (each level keeps the keyframe whose rendered loss on its pixels is lowest, its starting
    # pose among them), with no renders of its own; without a first phase a query then comes
    # back at its start, flagged kept_initial, exactly where no keyframe beat the start.
    polish_judge: str = "grid"
    polish_luma: bool = False  # fit luma only: one backward pass per polish iteration instead of three
    lm_damping: float = 1e-2  # initial Levenberg-Marquardt damping (relative to diag(J^T J))
    # The polish's Levenberg-Marquardt computes a query's Jacobian at every n-th of its
    # evaluations and keeps it in between (0: only at the first); the evaluations in between
    # render colours only (no backward passes). For poses that move millimetres (tracking); a
    # step is still kept only when it lowers the loss. 1: a Jacobian at every evaluation.
    polish_jacobian_every: int = 1
    # Levenberg-Marquardt also stops a query when a kept step lowered its loss by less than this
    # fraction (0: only the step-size tolerance and the damping's limit stop it).
    lm_ftol: float = 0.0
    lm_max_rot_deg: float = 1.0  # trust region: a polish step turns at most this much ...
    lm_max_trans: float = 0.01  # ... and moves at most this far (unit cube)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RefineConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def preset(cls, name: str, **overrides) -> "RefineConfig":
        """A named preset (PRESETS) with some fields overridden."""
        if name not in PRESETS:
            raise FastnefesError(f"refine preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named settings (`fastnefes refine --preset`), RefineConfig fields over the defaults, compared
# side by side by `fastnefes bench refine --presets default,nefes,fast` (docs/refinement.md).
# default (also named direct): the defaults above, direct alignment against rendered keyframes
# and a 4-level polish down to every pixel, the work bounded by pixels instead of image size.
# nefes: NeFeS's pipeline, 150 Adam iterations on the feature loss and a 3-level
# Levenberg-Marquardt RGB polish at strides 8, 4, 2 (the refine target "apr" runs it: Adam on
# the APR's weights). fast: nefes with a third of the iterations and a two-level polish of 10.
# lm: nefes with Levenberg-Marquardt on the feature residual and surface-band sampling (exact
# Jacobians by forward tangents: on a CPU each render costs several times an Adam one).
NEFES: dict = {"method": "adam", "iters": 150, "coarse_iters": 40, "max_feature_pixels": 0, "verify_rays": 4800,
               "polish_method": "lm", "polish_iters": 20, "polish_stride": 2, "polish_levels": 3,
               "polish_judge_pixels": 0}
PRESETS: dict[str, dict] = {
    "default": {},
    "direct": {},
    "nefes": NEFES,
    "fast": {**NEFES, "iters": 50, "coarse_iters": 15, "polish_iters": 10, "polish_levels": 2},
    "lm": {**NEFES, "method": "lm", "iters": 30, "coarse_iters": 10, "band_samples": 8, "lm_ftol": 1e-4},
}


_CHOICES = {"target": ("pose", "apr"), "method": ("adam", "lm", "direct"), "loss": ("cosine", "robust"),
            "signal": ("features", "rgb"), "polish_method": ("lm", "adam", "direct"), "polish_judge": ("grid", "keyframes")}
_AT_LEAST_ONE = {"coarse_factor", "patience", "check_every", "polish_levels", "polish_stride", "search_roll_steps",
                 "search_candidates"}


def checked_config(overrides: dict, where: str = "config", base: RefineConfig | None = None,
                   pose_only: bool = False) -> RefineConfig:
    """`base` (default RefineConfig()) with `overrides` (field -> value, e.g. from a JSON file)
    applied and checked: known fields, the field's type, non-negative finite numbers, known
    choices. Errors are one line naming `where` and the setting."""
    if not isinstance(overrides, dict):
        raise FastnefesError(f"{where}: expected a JSON object of RefineConfig settings, found {type(overrides).__name__}")
    cfg = RefineConfig(**(base or RefineConfig()).to_dict())
    known = [f.name for f in fields(RefineConfig)]
    for key, value in overrides.items():
        if key not in known:
            raise FastnefesError(f"{where}: unknown setting {key!r} (RefineConfig fields: {', '.join(known)})")
        default = getattr(cfg, key)
        if isinstance(default, (bool, str)):
            ok = type(value) is type(default)
        elif isinstance(default, int):
            ok = type(value) is int
        else:
            ok = type(value) in (int, float)
        if not ok:
            raise FastnefesError(f"{where}: {key}={value!r} should be {type(default).__name__} like its default {default!r}")
        choices = ("pose",) if pose_only and key == "target" else _CHOICES.get(key)
        if choices and value not in choices:
            raise FastnefesError(f"{where}: {key}={value!r} is not one of {', '.join(choices)}")
        low = 1 if key in _AT_LEAST_ONE else 0
        if type(value) in (int, float) and not (math.isfinite(value) and value >= low):
            raise FastnefesError(f"{where}: {key}={value!r} should be a finite number >= {low}")
        setattr(cfg, key, value)
    return cfg

