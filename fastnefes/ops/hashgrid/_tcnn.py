"""tiny-cuda-nn backend of the hash-grid encoding (CUDA only), evaluated with OUR parameter vector.

tcnn's grid uses the same flat layout as fastnefes.ops.hashgrid.config (that is the point of the
layout), so a tcnn Encoding object serves only as the kernel: the parameters passed in are ours,
cast to tcnn's parameter precision (fp16 on most GPUs). Outputs agree with the torch backend to
fp16 rounding. Importing this module registers the ("hashgrid", "tcnn") probe.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnefes.ops import backends
from fastnefes.ops.hashgrid.config import HashGridConfig

try:  # tinycudann raises (EnvironmentError, RuntimeError, ...) on machines without CUDA
    import tinycudann as _tcnn
    from tinycudann import modules as _tcnn_modules

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure means "not available"
    _tcnn = None
    _tcnn_modules = None
    _IMPORT_ERROR = f"tinycudann not importable ({type(exc).__name__}: {exc})".replace("\n", " ")


def _probe(device_type: str) -> str | None:
    if device_type != "cuda":
        return "tinycudann runs on CUDA only"
    return _IMPORT_ERROR


backends.register_probe("hashgrid", "tcnn", _probe)

# (config fields, device index) -> tcnn.Encoding used only for its kernels.
_ENCODINGS: dict[tuple, object] = {}


def _encoding_for(cfg: HashGridConfig, device: torch.device):
    key = (tuple(sorted(cfg.to_tcnn().items(), key=lambda kv: kv[0])), device.index)
    enc = _ENCODINGS.get(key)
    if enc is None:
        # Explicit hash and interpolation so a change of tcnn defaults cannot change the layout.
        config = {**cfg.to_tcnn(), "hash": "CoherentPrime", "interpolation": "Linear"}
        with torch.cuda.device(device):
            enc = _tcnn.Encoding(3, config)
        if enc.native_tcnn_module.n_params() != cfg.n_params:
            raise RuntimeError(f"tinycudann grid has {enc.native_tcnn_module.n_params()} params, "
                               f"fastnefes layout expects {cfg.n_params}")
        enc.params = None  # tcnn's own initial table is never used: free its GPU memory
        _ENCODINGS[key] = enc
    return enc


def hash_grid_encode_tcnn(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Same contract as hash_grid_encode_torch: x [N,3], params [P] -> [N, L*F] float32."""
    if _tcnn is None:
        raise RuntimeError(_IMPORT_ERROR or "tinycudann unavailable")
    if not x.is_cuda:
        raise ValueError("tcnn hash grid: x must be a CUDA tensor")
    enc = _encoding_for(cfg, x.device)
    n = x.shape[0]
    granularity = int(_tcnn_modules._C.batch_size_granularity())
    padded = (n + granularity - 1) // granularity * granularity
    x32 = x.to(torch.float32)
    if padded != n:
        x32 = torch.nn.functional.pad(x32, [0, 0, 0, padded - n])
    out = _tcnn_modules._module_function.apply(
        enc.native_tcnn_module, x32.contiguous(), params.to(enc.dtype).contiguous(), enc.loss_scale)
    return out[:n, : cfg.n_output_dims].to(torch.float32)
