"""Request and response models of the refinement service (pydantic: they are the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastnefes.serve import require_extra

try:  # the serve extra: without it, one line saying how to install it
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:
    require_extra()
    raise

MAX_SIDE = 16384  # pixels: a camera larger than this is refused before any image is decoded


class Camera(BaseModel):
    """Pinhole intrinsics in pixels of the uploaded image, and that image's size."""

    model_config = ConfigDict(extra="forbid")
    width: int = Field(ge=8, le=MAX_SIDE)
    height: int = Field(ge=8, le=MAX_SIDE)
    fx: float = Field(gt=0, allow_inf_nan=False)
    fy: float = Field(gt=0, allow_inf_nan=False)
    cx: float = Field(allow_inf_nan=False)
    cy: float = Field(allow_inf_nan=False)


class RefineSettings(BaseModel):
    """The refinement settings a request may change (fastnefes.refine.RefineConfig, same names
    and meanings as `fastnefes refine`'s options); unset ones are the server's. Requests with
    different settings are refined in different batches."""

    model_config = ConfigDict(extra="forbid")
    iters: Optional[int] = Field(None, ge=0, le=2000)
    coarse_iters: Optional[int] = Field(None, ge=0, le=2000)
    loss: Optional[Literal["cosine", "robust"]] = None
    signal: Optional[Literal["features", "rgb"]] = None
    verify: Optional[bool] = None
    restarts: Optional[int] = Field(None, ge=0, le=8)
    search_pad: Optional[float] = Field(None, ge=0, le=1)
    search_second_opinion: Optional[bool] = None
    match_rounds: Optional[int] = Field(None, ge=0, le=8)
    polish_iters: Optional[int] = Field(None, ge=0, le=1000)
    polish_stride: Optional[int] = Field(None, ge=1, le=64)
    polish_levels: Optional[int] = Field(None, ge=1, le=6)
    polish_rays: Optional[int] = Field(None, ge=0)
    polish_luma: Optional[bool] = None

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RefineQuery(BaseModel):
    """The JSON part of POST /refine (multipart field `query`)."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, max_length=1024, description="Echoed back (e.g. the image's name).")
    camera: Camera
    pose: list[float] = Field(min_length=7, max_length=7,
                              description="Initial pose [qw, qx, qy, qz, tx, ty, tz], world-to-camera (pose-file convention).")
    settings: RefineSettings = Field(default_factory=RefineSettings)


class Timings(BaseModel):
    decode_ms: float = Field(description="Parsing and decoding the upload.")
    queue_ms: float = Field(description="Waiting to be gathered into a batch.")
    refine_ms: float = Field(description="The batch's refinement (shared by its queries).")
    total_ms: float = Field(description="From the upload's arrival to the answer.")
    batch_size: int = Field(description="Queries refined together in this query's batch.")


class RefineResponse(BaseModel):
    name: Optional[str]
    pose: list[float] = Field(description="Refined pose [qw, qx, qy, qz, tx, ty, tz] (the initial one when status is kept_initial or failed).")
    initial_pose: list[float]
    status: str
    confidence: Optional[float] = Field(None, description="When the refiner's diagnostics carry one.")
    initial_loss: Optional[float] = None
    final_loss: Optional[float] = None
    iterations: Optional[int] = None
    diagnostics: dict[str, Any] = Field(description="Every per-query diagnostic the refiner reports.")
    timings: Timings


class ErrorResponse(BaseModel):
    error: str
    field: Optional[str] = Field(None, description="The part of the request at fault: image, query, pose, camera.fx, settings.iters, ...")
