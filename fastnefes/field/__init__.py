"""The feature field: geometry, heads, ACT, Feature Fusion, the 2D encoder, the bundled model."""

from fastnefes.field.model import FeatureFieldModel, ModelConfig

__all__ = ["FeatureFieldModel", "ModelConfig"]
