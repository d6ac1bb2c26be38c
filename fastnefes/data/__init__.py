"""Scenes: the Scene type, one loader (and writer) per format, the synthetic generator."""

from fastnefes.data.scene import SPLITS, Scene

__all__ = ["SPLITS", "Scene"]
