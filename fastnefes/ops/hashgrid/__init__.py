"""Multiresolution hash-grid encoding: one function, backend chosen at run time.

Backends (see fastnefes.ops.backends): tcnn (tinycudann, CUDA) > native (csrc) > torch.
All share tiny-cuda-nn's parameter layout, so a trained parameter vector moves between them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastnefes.ops import backends
from fastnefes.ops.hashgrid._torch_impl import hash_grid_encode_torch
from fastnefes.ops.hashgrid.config import GridLevel, HashGridConfig

__all__ = ["GridLevel", "HashGridConfig", "HashGridEncoding", "hash_grid_encode", "hash_grid_encode_torch",
           "backend_for"]


def _native_fn() -> Callable | None:
    try:
        from fastnefes.ops._native import hash_grid_encode_native
    except ImportError as exc:
        backends.warn_once("hashgrid:native:import", f"fastnefes: native hash grid unavailable ({exc}); using torch")
        return None
    return hash_grid_encode_native


def _tcnn_fn() -> Callable | None:
    try:
        from fastnefes.ops.hashgrid._tcnn import hash_grid_encode_tcnn
    except ImportError as exc:
        backends.warn_once("hashgrid:tcnn:import", f"fastnefes: tcnn hash grid unavailable ({exc}); using torch")
        return None
    return hash_grid_encode_tcnn


def backend_for(device_type: str) -> str:
    """The backend name `hash_grid_encode` uses for tensors on `device_type`."""
    name = backends.resolve("hashgrid", device_type)
    if name == "native" and _native_fn() is None or name == "tcnn" and _tcnn_fn() is None:
        return "torch"
    return name


def hash_grid_encode(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Encode x [N,3] in [0,1] with the flat table params [cfg.n_params] -> [N, L*F] float.

    Differentiable w.r.t. params and x. Column = level * F + f. Backend: `backend_for(x.device.type)`.
    """
    name = backends.resolve("hashgrid", x.device.type)
    fn = _tcnn_fn() if name == "tcnn" else _native_fn() if name == "native" else None
    if fn is None:
        fn = hash_grid_encode_torch
    return fn(x, params, cfg)


class HashGridEncoding(nn.Module):
    """Hash-grid encoding with its own parameter table (tcnn layout, init uniform(-1e-4, 1e-4)).

    forward: x [N,3] in [0,1] -> [N, n_output_dims] float32.
    """

    def __init__(self, cfg: HashGridConfig | dict) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, HashGridConfig) else HashGridConfig.from_dict(cfg)
        self.params = nn.Parameter(torch.empty(self.cfg.n_params, dtype=torch.float32).uniform_(-1e-4, 1e-4))

    @property
    def n_output_dims(self) -> int:
        return self.cfg.n_output_dims

    @property
    def backend(self) -> str:
        """Name of the backend used for this module's device."""
        return backend_for(self.params.device.type)

    def forward(self, x: Tensor) -> Tensor:
        return hash_grid_encode(x.to(torch.float32), self.params, self.cfg).to(torch.float32)

    def extra_repr(self) -> str:
        return f"{self.cfg}, n_params={self.cfg.n_params}"
