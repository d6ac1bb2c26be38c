"""Tracking: refine an ordered image sequence, each frame started from a motion prediction.

Each segment of a sequence (fastnefes.refine.sequence) starts at a frame with a given pose,
refined with the start setting (refine's defaults: the pose may be coarse, an APR's). Every later
frame starts from a constant-velocity prediction and is refined with the light per-frame setting
(TRACK_FRAME): the prediction is a few millimetres off at 30 frames per second, so a short
photometric polish suffices. Each query is first mapped to the field's exposure
(fastnefes.refine.exposure), since the polish compares colours as they are.

Motion model (constant velocity on SE(3)): the next frame starts at T_k = T_{k-1} V, where V is
the mean motion per frame (in the camera's own frame) between the oldest and the newest accepted
frame (status converged or max_iters) of the last VELOCITY_WINDOW frames, a and b:
V = exp(log(T_a^-1 T_b) / (b - a)). Two consecutive frames give the textbook prediction; averaging
over a few frames keeps the per-frame refinement noise (millimetres) from being doubled into the
prediction. A kept prediction (kept_initial: the polish found no pose its renders judged better,
as happens where the prediction is already within the field's resolution) returns the prediction
and does not count as a measurement, but the velocity carries over it, for at most MAX_COAST
such frames in a row: resetting it there started the next frame a whole frame's motion behind.
A failed frame, or a longer run of kept ones, clears the velocity: the next frame starts from
the last pose with zero velocity, and the velocity resumes from two accepted frames.
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
# one photometric level of direct alignment on the most textured pixels.
TRACK_FRAME: dict = {
    "signal": "rgb",
    "iters": 0,
    "search_pad": 0.0,
    "stride": 4,
    "polish_levels": 1,
    # Direct alignment against keyframes rendered at the pose: no backward passes through the
    # field (a Levenberg-Marquardt iteration needs three).
    "polish_method": "direct",
    "polish_iters": 4,  # keyframe renders at most, the last one judging the final solve
    "polish_stride": 2,  # keyframe pixels on the half-resolution grid
    "polish_rays": 1200,  # the most textured pixel of each block of that grid
    # Judged by its keyframe renders alone: the keyframe whose rendered loss on those 1200
    # pixels is lowest, the prediction among them, is the frame's pose (flagged kept_initial
    # where that is the prediction). The grid judge and the pixel check compare 4x4 block
    # averages of the query with single rays, a difference of their own at a frame's few
    # millimetres: with them 97.3% of the room sequence's frames ended within 2 cm / 0.5 deg,
    # without them all (docs/tracking.md).
    "polish_judge": "keyframes",
    "verify_rays": 0,
}
# A segment's first frame: refine's defaults.
TRACK_START: dict = {}
EXPOSURE_STRIDE = 8  # render stride of the exposure matching (image pixels per ray)
VELOCITY_WINDOW = 4  # frames the velocity is averaged over (1: the last two poses)
MAX_COAST = 2  # kept predictions in a row the velocity is carried across

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
        max_coast: consecutive kept predictions the velocity is carried across.
    """

    def __init__(self, model, frame_config: Optional[RefineConfig] = None, start_config: Optional[RefineConfig] = None,
                 exposure_stride: int = EXPOSURE_STRIDE, velocity_window: int = VELOCITY_WINDOW,
                 max_coast: int = MAX_COAST):
        if velocity_window < 1 or max_coast < 0:
            raise ValueError(f"velocity_window must be >= 1 and max_coast >= 0, got {velocity_window}, {max_coast}")
        self.model = model
        self.exposure_stride = exposure_stride
        self.velocity_window = velocity_window
        self.max_coast = max_coast
        self.frame_refiner = Refiner(model, frame_config or refine_config(TRACK_FRAME))
        self.start_refiner = Refiner(model, start_config or refine_config(TRACK_START))
        self._start: Optional[np.ndarray] = None
        self._last: Optional[np.ndarray] = None  # [4, 4] the last frame's pose
        self._accepted: list[tuple[int, np.ndarray]] = []  # (frame number, pose) of the window's accepted frames
        self._frame = 0  # frames tracked since the start
        self._flagged_run = 0  # consecutive flagged frames up to the last

    def start(self, c2w: np.ndarray) -> None:
        """(Re)start: the next frame is refined from c2w [4, 4] with the start setting."""
        self._start = np.asarray(c2w, dtype=np.float64)
        self._last, self._accepted, self._frame, self._flagged_run = None, [], 0, 0

    def velocity(self) -> Optional[np.ndarray]:
        """[4, 4] motion per frame in the camera's frame: the mean between the oldest and the
        newest accepted frame of the last velocity_window frames (over the frames between them,
        flagged ones included); None with fewer than two."""
        if len(self._accepted) < 2:
            return None
        (k0, first), (k1, last) = self._accepted[0], self._accepted[-1]
        return se3_exp(se3_log(np.linalg.solve(first, last)) / (k1 - k0))

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
        """An accepted frame joins the velocity's window. A kept prediction (kept_initial: the
        polish found no pose its renders judged better) keeps the velocity for at most max_coast
        frames in a row; a failed frame, or one flagged beyond that, clears it (zero velocity)."""
        self._frame += 1
        if frame.accepted:
            self._flagged_run = 0
            recent = self._accepted + [(self._frame, frame.pose)]
            self._accepted = [(k, pose) for k, pose in recent if k >= self._frame - self.velocity_window]
        else:
            self._flagged_run += 1
            if frame.diagnostics.status == "failed" or self._flagged_run > self.max_coast:
                self._accepted = []
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
    tracker_options: Optional[dict] = None,
) -> Trajectory:
    """Track every image of `split` in sequence order (fastnefes.refine.sequence); `init` gives
    the first frame's pose of each sequence, and every other pose it gives restarts tracking there.
    tracker_options: Tracker keyword arguments (exposure_stride, velocity_window, max_coast)."""
    from fastnefes.refine.sequence import tracking_segments

    where = f"the {split} split of {scene.root}"
    index = {scene.names[i]: i for i in scene.split(split)}
    if not index:
        raise FastnefesError(f"{scene.root}: split {split!r} has no images")
    check_init_poses(init, list(index), init_path, where)
    segments = tracking_segments(list(index), set(init), where, init_path)
    tracker = Tracker(model, frame_config, start_config, **(tracker_options or {}))
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
