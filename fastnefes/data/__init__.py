"""Scenes: the Scene type, one loader (and writer) per format, the synthetic generator."""

from fastnefes.data.load import FORMATS, detect_format, load_scene, write_scene
from fastnefes.data.normalize import SceneNormalization, compute_normalization
from fastnefes.data.scene import SPLITS, Scene

__all__ = [
    "SPLITS", "Scene", "FORMATS", "detect_format", "load_scene", "write_scene",
    "SceneNormalization", "compute_normalization",
]
