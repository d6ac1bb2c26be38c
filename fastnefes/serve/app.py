"""The refinement service: a FastAPI app around one trained run and a dynamic batcher.

POST /refine takes a query image (multipart field `image`, PNG or JPEG) and its JSON (multipart
field `query`: camera, initial pose, optional settings; schemas.RefineQuery) and answers with
the refined pose and the refiner's diagnostics. GET /health, GET /info; OpenAPI docs at /docs.
Every bad request is a 4xx JSON error {"error": ..., "field": ...}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

from fastnefes.errors import FastnefesError
from fastnefes.serve import require_extra

try:  # the serve extra: without it, one line saying how to install it
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import ValidationError
except ImportError:
    require_extra()
    raise
from fastnefes.refine.config import RefineConfig
from fastnefes.serve.batcher import DynamicBatcher
from fastnefes.serve.schemas import ErrorResponse, RefineQuery, RefineResponse, RefineSettings, Timings
from fastnefes.serve.wire import WireError, camera_matrix, decode_image, pose_from_wire, pose_to_wire

ERRORS = {code: {"model": ErrorResponse} for code in (413, 422, 500)}


def settings_config(base: RefineConfig, overrides: dict[str, Any], where: str = "settings") -> RefineConfig:
    """base with the whitelisted settings of `overrides` (schemas.RefineSettings) applied."""
    try:
        settings = RefineSettings.model_validate(overrides)
    except ValidationError as exc:
        raise WireError(*_first_error(exc, where)) from None
    return RefineConfig.from_dict({**base.to_dict(), **settings.overrides()})


def _first_error(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """(field, message) of a pydantic error, the field as a dotted path ("camera.fx")."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
    field = ".".join(p for p in (prefix, loc) if p) or prefix or "query"
    return field, err.get("msg", "invalid value")


def _rss_mb() -> Optional[float]:
    """Resident memory of this process (MiB), from /proc (Linux); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RefineService:
    """The model, the server's default settings and the batcher that owns the model."""

    def __init__(self, model, run: str | Path, defaults: RefineConfig, max_batch: int, max_wait_s: float,
                 data_record: Optional[dict] = None, max_upload_bytes: int = 32 * 2**20):
        from fastnefes.refine.refiner import Refiner

        if defaults.target != "pose":
            raise FastnefesError(f"settings: the service refines poses (target 'pose'), not {defaults.target!r}")
        self.model, self.run, self.defaults = model, Path(run), defaults
        self.data_record, self.max_upload_bytes = data_record, max_upload_bytes
        self._refiner = Refiner
        self.batcher = DynamicBatcher(self._refine, max_batch, max_wait_s)
        self.started = time.time()
        self.received = 0
        self.rejected: Counter[int] = Counter()  # HTTP status -> requests refused with it
        self._lock = threading.Lock()

    def _refine(self, config, images, K, c2w):
        return self._refiner(self.model, config).refine(images, K, c2w)

    def warm_up(self) -> Optional[str]:
        """Refine one synthetic query (a black image seen from the scene's centre) with the
        default settings cut to a few iterations, so lazily built kernels and buffers exist
        before the first real query arrives. Returns the error where that refinement raised."""
        import numpy as np

        side = 64
        K = np.array([[side, 0.0, side / 2], [0.0, side, side / 2], [0.0, 0.0, 1.0]])
        c2w = np.eye(4)
        c2w[:3, 3] = np.asarray(self.model.normalization.center, dtype=np.float64)
        d = self.defaults
        config = RefineConfig.from_dict({**d.to_dict(), "iters": min(d.iters, 2), "coarse_iters": min(d.coarse_iters, 1),
                                         "polish_iters": min(d.polish_iters, 1)})
        try:
            self._refine(config, np.zeros((1, side, side, 3), np.uint8), K[None], c2w[None])
        except Exception as exc:  # noqa: BLE001 - a real query would get a 500; the service still starts
            return f"{type(exc).__name__}: {exc}"
        return None

    def count(self, status: Optional[int] = None) -> None:
        with self._lock:
            if status is None:
                self.received += 1
            else:
                self.rejected[status] += 1

    def info(self) -> dict:
        import torch

        import fastnefes
        from fastnefes.ops import backends
        from fastnefes.serve.schemas import RefineSettings as Settings

        device = self.model.device
        with self._lock:
            requests = {"received": self.received, "rejected": {str(k): v for k, v in sorted(self.rejected.items())}}
        return {
            "run": str(self.run), "device": str(device), "version": fastnefes.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "backends": {row["op"]: row["backend"] for row in backends.report(device.type)},
            "settings": self.defaults.to_dict(), "request_settings": sorted(Settings.model_fields),
            "batching": self.batcher.counters(), "requests": requests, "data_options": self.data_record,
            "max_upload_bytes": self.max_upload_bytes, "memory_rss_mb": _rss_mb(),
            "uptime_s": time.time() - self.started,
        }


def _error(status: int, message: str, field: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


class UploadLimit:
    """ASGI middleware: a POST body over max_bytes is answered 413 before the app parses it
    (the body is read and dropped, up to 8 times the limit, so the client gets the answer)."""

    def __init__(self, app, service: RefineService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.service.max_upload_bytes
        chunks, total, more = [], 0, True
        while more and total <= 8 * limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total <= limit:
                chunks.append(body)
            more = message.get("more_body", False)
        if total > limit:
            self.service.count()
            self.service.count(413)
            response = _error(413, f"upload of more than {limit} bytes (the server's --max-upload-mb)", "image")
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(service: RefineService, batcher_thread: bool = True) -> FastAPI:
    """The app; batcher_thread: its lifespan runs the batcher on a thread of its own (False: the
    caller runs service.batcher.run(), as `fastnefes serve` does on its main thread)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if batcher_thread:
            service.batcher.start()
        yield
        if batcher_thread:
            service.batcher.stop()

    app = FastAPI(title="fastnefes refinement service", version="1",
                  description="Camera pose refinement against a trained feature field, with dynamic batching.",
                  lifespan=lifespan)
    app.add_middleware(UploadLimit, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        service.count(422)
        return _error(422, f"{field}: {err.get('msg', 'invalid request')}", field)

    @app.exception_handler(WireError)
    async def bad_query(request: Request, exc: WireError):
        service.count(422)
        return _error(422, str(exc), exc.field)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        service.count(500)
        return _error(500, f"refinement failed: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: answers while the worker refines."""
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        """The run, device, backends, default settings and batching counters."""
        return service.info()

    @app.post("/refine", response_model=RefineResponse, responses=ERRORS)
    async def refine(image: UploadFile = File(description="The query image, PNG or JPEG, of the camera's size."),
                     query: str = Form(description="JSON: {name?, camera: {width, height, fx, fy, cx, cy}, "
                                                   "pose: [qw, qx, qy, qz, tx, ty, tz], settings?} (schemas.RefineQuery).")):
        """Refine one query's pose. Concurrent queries are batched; each gets its own answer."""
        arrived = time.perf_counter()
        service.count()
        try:
            parsed = RefineQuery.model_validate_json(query)
        except ValidationError as exc:
            field, message = _first_error(exc)
            if exc.errors()[0].get("type") == "json_invalid":
                field, message = "query", f"not valid JSON ({message})"
            raise WireError(field, message) from None
        data = await image.read()
        camera = parsed.camera
        pixels = await run_in_threadpool(decode_image, data, camera.width, camera.height)
        c2w = pose_from_wire(parsed.pose)
        config = settings_config(service.defaults, parsed.settings.overrides())
        decoded = time.perf_counter()
        answer = await asyncio.wrap_future(service.batcher.submit(pixels, camera_matrix(camera.model_dump()), c2w, config))
        diag = answer.result.diagnostics[0].to_dict()
        timings = Timings(decode_ms=(decoded - arrived) * 1e3, queue_ms=answer.queue_s * 1e3,
                          refine_ms=answer.refine_s * 1e3, total_ms=(time.perf_counter() - arrived) * 1e3,
                          batch_size=answer.batch_size)
        return RefineResponse(name=parsed.name, pose=pose_to_wire(answer.result.poses[0]),
                              initial_pose=pose_to_wire(answer.result.initial[0]), status=diag.get("status", "unknown"),
                              confidence=diag.get("confidence"), initial_loss=diag.get("initial_loss"),
                              final_loss=diag.get("final_loss"), iterations=diag.get("iterations"),
                              diagnostics=json.loads(json.dumps(diag, default=str)), timings=timings)

    return app
