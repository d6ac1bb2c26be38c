"""Synthetic scenes: a procedural metric room rendered by exact ray casting."""

from fastnefes.data.synth.generate import (
    apply_exposure,
    frame_exposures,
    make_synthetic_scene,
    render_view,
    synthetic_intrinsics,
    synthetic_write_options,
)
from fastnefes.data.synth.room import Room, make_room

__all__ = [
    "apply_exposure", "frame_exposures", "make_synthetic_scene", "render_view", "synthetic_intrinsics",
    "synthetic_write_options", "Room", "make_room",
]
