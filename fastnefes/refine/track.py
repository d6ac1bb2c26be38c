"""Tracking: refine an ordered image sequence, each frame started from a motion prediction.

Each segment of a sequence (fastnefes.refine.sequence) starts at a frame with a given pose,
refined with the start setting (refine's defaults: the pose may be coarse, an APR's). Every later
frame starts from a constant-velocity prediction and is refined with the light per-frame setting
(TRACK_FRAME): the prediction is a few millimetres off at 30 frames per second, so a short
photometric polish suffices. Each query is first mapped to the field's exposure
(fastnefes.refine.exposure), since the polish compares colours as they are.

Motion model (constant velocity on SE(3)): the next frame starts at T_k = T_{k-1} V, where V is
the mean motion per frame (in the camera's own frame) over the latest run of consecutive accepted
frames, at most VELOCITY_WINDOW frames back: V = exp(log(T_{k-1-n}^-1 T_{k-1}) / n). One frame
back (n = 1) is the textbook prediction from the last two poses; averaging over a few frames keeps
the per-frame refinement noise (millimetres) from being doubled into the prediction. Only accepted
refinements (status converged or max_iters) count: a flagged frame (kept_initial, failed)
returns its prediction unverified, so it ends the run and the next frame starts from it with
zero velocity; the velocity resumes once two consecutive frames are accepted again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.geometry import orthonormalize, se3_exp, se3_log
from fastnefes.refine.config import RefineConfig, checked_config
from fastnefes.refine.exposure import apply_exposure_correction, exposure_to_field
from fastnefes.refine.refiner import QueryDiagnostics, Refiner

# The per-frame setting, as overrides of RefineConfig: no feature phase and no rotation search,
# one Levenberg-Marquardt photometric level on the most textured rays.
TRACK_FRAME: dict = {
    "signal": "rgb",
    "iters": 0,
    "search_pad": 0.0,
    "stride": 4,
    "polish_levels": 1,
    # Direct alignment against keyframes rendered at the pose (no backward passes): on the room
    # sequence a median 0.55 cm against 0.97 cm for 5 Levenberg-Marquardt iterations on 300 rays,
    # in two thirds of the time (docs/tracking.md).
    "polish_method": "direct",
    "polish_iters": 4,  # keyframe renders at most, the last one judging the final solve
    "polish_stride": 2,  # keyframe pixels on the half-resolution grid
    "polish_rays": 1200,  # the most textured pixel of each block of that grid
    "polish_judge_pixels": 1200,  # the judge on the 1200-pixel grid the pixel check renders (shared)
    "verify_rays": 1200,  # the pixel check on the judge's grid (one render per pose for both)
}
# A segment's first frame: refine's defaults.
TRACK_START: dict = {}
EXPOSURE_STRIDE = 8  # render stride of the exposure matching (image pixels per ray)
VELOCITY_WINDOW = 4  # frames the velocity is averaged over (1: the last two poses)

ACCEPTED = ("converged", "max_iters")
def refine_config(overrides: dict, where: str = "config") -> RefineConfig:
    """RefineConfig with `overrides` applied and checked (config.checked_config); tracking
    refines poses only."""
    return checked_config(overrides, where, pose_only=True)


@dataclass
class TrackedFrame:
    name: str
    start: bool  # the segment's first frame (refined from a given pose with the start setting)
    motion: str  # what gave the initial pose: "init", "constant_velocity" or "zero_velocity"
    predicted: np.ndarray  # [4, 4] camera-to-world the refinement started from
    pose: np.ndarray  # [4, 4] tracked camera-to-world
    diagnostics: QueryDiagnostics
    latency_s: float  # wall time of the frame: prediction, exposure matching, refinement (not image decoding)
    exposure: tuple[list[float], list[float]]  # per-channel (gain, bias) mapping the query to the field's exposure

    @property
    def accepted(self) -> bool:
        return self.diagnostics.status in ACCEPTED


class Tracker:
    """Frame-by-frame tracking against one model: `start(pose)`, then `track(image, K)` per frame.

    Args:
        model: a trained FeatureFieldModel in eval mode.
        frame_config: RefineConfig of the tracked frames (default: TRACK_FRAME).
        start_config: RefineConfig of a segment's first frame (default: TRACK_START).
        exposure_stride: render stride of the exposure matching at the predicted pose; 0 = off.
        velocity_window: frames the constant velocity is measured over (1: from the last two poses).
    """

    def __init__(self, model, frame_config: Optional[RefineConfig] = None, start_config: Optional[RefineConfig] = None,
                 exposure_stride: int = EXPOSURE_STRIDE, velocity_window: int = VELOCITY_WINDOW):
        if velocity_window < 1:
            raise ValueError(f"velocity_window must be >= 1, got {velocity_window}")
        self.model = model
        self.exposure_stride = exposure_stride
        self.velocity_window = velocity_window
        self.frame_refiner = Refiner(model, frame_config or refine_config(TRACK_FRAME))
        self.start_refiner = Refiner(model, start_config or refine_config(TRACK_START))
        self._start: Optional[np.ndarray] = None
        self._last: Optional[np.ndarray] = None  # [4, 4] the last frame's pose
        self._refined: list[np.ndarray] = []  # the latest run of consecutive accepted poses, oldest first

    def start(self, c2w: np.ndarray) -> None:
        """(Re)start: the next frame is refined from c2w [4, 4] with the start setting."""
        self._start = np.asarray(c2w, dtype=np.float64)
        self._last, self._refined = None, []

    def velocity(self) -> Optional[np.ndarray]:
        """[4, 4] motion per frame in the camera's frame, the mean over the latest run of accepted
        frames (at most velocity_window frames back); None with fewer than two."""
        if len(self._refined) < 2:
            return None
        first, last = self._refined[0], self._refined[-1]
        return se3_exp(se3_log(np.linalg.solve(first, last)) / (len(self._refined) - 1))

    def predict(self) -> tuple[np.ndarray, str]:
        """The next frame's initial pose [4, 4] and what gave it."""
        if self._start is not None:
            return self._start, "init"
        if self._last is None:
            raise RuntimeError("Tracker.track before Tracker.start")
        velocity = self.velocity()
        if velocity is None:
            return self._last, "zero_velocity"
        pred = self._last @ velocity
        pred[:3, :3] = orthonormalize(pred[:3, :3])
        return pred, "constant_velocity"

    def _update_motion(self, frame: TrackedFrame) -> None:
        """An accepted frame extends the run of refined poses; a flagged one (its pose is its
        prediction, unverified) ends it, so the next frame starts with zero velocity."""
        self._refined = (self._refined + [frame.pose])[-(self.velocity_window + 1):] if frame.accepted else []
        self._last = frame.pose

    def track(self, image: np.ndarray, K: np.ndarray, name: str = "") -> TrackedFrame:
        """Track one frame: image [H, W, 3] uint8, K [3, 3] at its resolution."""
        t0 = time.perf_counter()
        image, K = np.asarray(image), np.asarray(K)
        start = self._start is not None
        predicted, motion = self.predict()
        gain, bias = np.ones(3), np.zeros(3)
        if self.exposure_stride > 0:
            gain, bias = exposure_to_field(self.model, image, K, predicted, self.exposure_stride)
            image = apply_exposure_correction(image, gain, bias)
        refiner = self.start_refiner if start else self.frame_refiner
        result = refiner.refine(image[None], K[None], predicted[None])
        frame = TrackedFrame(name, start, motion, predicted, result.poses[0], result.diagnostics[0], time.perf_counter() - t0,
                             (gain.tolist(), bias.tolist()))
        self._start = None
        self._update_motion(frame)
        return frame


def _percentiles_ms(seconds: list[float]) -> dict:
    t = np.asarray(seconds) * 1e3
    if t.size == 0:
        return {}
    return {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "p99": float(np.percentile(t, 99)),
            "mean": float(t.mean()), "max": float(t.max())}


@dataclass
class Trajectory:
    """A tracked split: frames in sequence order."""

    frames: list[TrackedFrame] = field(default_factory=list)

    @property
    def poses(self) -> dict[str, np.ndarray]:
        return {f.name: f.pose for f in self.frames}

    @property
    def predicted(self) -> dict[str, np.ndarray]:
        return {f.name: f.predicted for f in self.frames}

    def latency_ms(self, start: bool = False) -> dict:
        """Percentiles of the tracked frames' latency (start=True: of the segments' first frames)."""
        return _percentiles_ms([f.latency_s for f in self.frames if f.start == start])

    def status_counts(self) -> dict:
        counts: dict[str, int] = {}
        for f in self.frames:
            counts[f.diagnostics.status] = counts.get(f.diagnostics.status, 0) + 1
        return counts

    def to_json(self) -> dict:
        return {
            "latency_ms": self.latency_ms(),
            "start_latency_ms": self.latency_ms(start=True),
            "status_counts": self.status_counts(),
            "frames": [{"name": f.name, "start": f.start, "motion": f.motion, **f.diagnostics.to_dict(),
                        "latency_ms": f.latency_s * 1e3, "exposure_gain": f.exposure[0], "exposure_bias": f.exposure[1]}
                       for f in self.frames],
        }


def check_init_poses(init: dict[str, np.ndarray], names: list[str], init_path: str | Path, where: str) -> None:
    """Every init name is an image of the split, and every pose a finite rigid transform."""
    known = set(names)
    for name, c2w in init.items():
        if name not in known:
            raise FastnefesError(f"{init_path}: image {name!r} is not in {where}")
        R = c2w[:3, :3]
        if not np.all(np.isfinite(c2w)) or not np.allclose(R.T @ R, np.eye(3), atol=1e-3):
            raise FastnefesError(f"{init_path}: pose of {name!r} is not a finite rigid transform")


def track_split(
    model,
    scene,
    split: str,
    init: dict[str, np.ndarray],
    frame_config: Optional[RefineConfig] = None,
    start_config: Optional[RefineConfig] = None,
    init_path: str | Path = "init",
    on_frame: Optional[Callable[[TrackedFrame], None]] = None,
) -> Trajectory:
    """Track every image of `split` in sequence order (fastnefes.refine.sequence); `init` gives
    the first frame's pose of each sequence, and every other pose it gives restarts tracking there."""
    from fastnefes.refine.sequence import tracking_segments

    where = f"the {split} split of {scene.root}"
    index = {scene.names[i]: i for i in scene.split(split)}
    if not index:
        raise FastnefesError(f"{scene.root}: split {split!r} has no images")
    check_init_poses(init, list(index), init_path, where)
    segments = tracking_segments(list(index), set(init), where, init_path)
    tracker = Tracker(model, frame_config, start_config)
    if any(c.verify and c.verify_rays > 0 for c in (tracker.frame_refiner.config, tracker.start_refiner.config)):
        from fastnefes.refine.verify import calibrate_pixel_check

        calibrate_pixel_check(model, scene)  # the pixel check's absolute floor
    trajectory = Trajectory()
    for segment in segments:
        tracker.start(init[segment.names[0]])
        for name in segment.names:
            i = index[name]
            frame = tracker.track(scene.image(i), scene.K[i], name)
            trajectory.frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
    return trajectory
