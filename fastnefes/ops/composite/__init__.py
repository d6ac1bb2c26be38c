"""Compositing of packed ray samples: one function, backend chosen at run time (native > torch)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from fastnefes.ops import backends
from fastnefes.ops.composite._torch_impl import (TRANSMITTANCE_THRESHOLD, CompositeOutput, composite_torch,
                                                  sample_weights)

__all__ = ["CompositeOutput", "composite", "composite_torch", "sample_weights", "backend_for", "TRANSMITTANCE_THRESHOLD"]


def _native_fn() -> Callable | None:
    try:
        from fastnefes.ops._native import composite_native
    except ImportError as exc:
        backends.warn_once("composite:native:import", f"fastnefes: native composite unavailable ({exc}); using torch")
        return None
    return composite_native


def backend_for(device_type: str) -> str:
    """The backend name `composite` uses for tensors on `device_type`."""
    name = backends.resolve("composite", device_type)
    return "native" if name == "native" and _native_fn() is not None else "torch"


def composite(sigmas: Tensor, rgbs: Tensor, features: Tensor | None, t_starts: Tensor, t_ends: Tensor,
              ray_indices: Tensor, n_rays: int, detach_feature_weights: bool = True,
              transmittance_threshold: float = TRANSMITTANCE_THRESHOLD) -> CompositeOutput:
    """Composite packed samples; see composite_torch for shapes and semantics."""
    fn = _native_fn() if backends.resolve("composite", sigmas.device.type) == "native" else None
    return (fn or composite_torch)(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays,
                                   detach_feature_weights=detach_feature_weights,
                                   transmittance_threshold=transmittance_threshold)
