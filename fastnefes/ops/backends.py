"""Run-time choice of the backend behind each fast op, and a report of the choice.

Ops and their backends, best first:
    hashgrid:  tcnn (CUDA, tinycudann importable) > native (csrc, CPU and CUDA) > torch
    occgrid:   nerfacc (CUDA, nerfacc's CUDA extension loads) > native (csrc, CPU and CUDA) > torch
    composite: native (csrc, CPU and CUDA) > torch

`FASTNEFES_BACKEND=torch` forces every op onto its pure-torch reference; a per-op variable
(`FASTNEFES_HASHGRID_BACKEND`, `FASTNEFES_OCCGRID_BACKEND`, `FASTNEFES_COMPOSITE_BACKEND`)
forces one op (`auto` = best available). A forced backend that is unavailable falls back with
one warning naming the reason.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

OPS = {
    "hashgrid": ("tcnn", "native", "torch"),
    "occgrid": ("nerfacc", "native", "torch"),
    "composite": ("native", "torch"),
}

# (op, backend) -> probe(device_type) -> None if usable, else the reason it is not.
_PROBES: dict[tuple[str, str], Callable[[str], str | None]] = {}
_warned: set[str] = set()
# Modules that register probes when imported; missing ones simply leave their backend out.
_PROBE_MODULES = ("fastnefes.ops._backend", "fastnefes.ops.hashgrid._tcnn", "fastnefes.ops.occgrid._nerfacc")
_probes_loaded = False


def _load_probe_modules() -> None:
    global _probes_loaded
    if _probes_loaded:
        return
    _probes_loaded = True
    import importlib

    for name in _PROBE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def register_probe(op: str, backend: str, probe: Callable[[str], str | None]) -> None:
    """Register the availability test of one backend of one op."""
    _PROBES[(op, backend)] = probe


_probe_cache: dict[tuple[str, str, str], str | None] = {}


def forget_probes() -> None:
    """Drop cached probe results (a backend that failed to build after probing as available)."""
    _probe_cache.clear()


def _probe(op: str, backend: str, device_type: str) -> str | None:
    """Cached: a backend's availability does not change within a process (resolve runs per op call)."""
    key = (op, backend, device_type)
    if key not in _probe_cache:
        _probe_cache[key] = _probe_uncached(op, backend, device_type)
    return _probe_cache[key]


def _probe_uncached(op: str, backend: str, device_type: str) -> str | None:
    if backend == "torch":
        return None
    _load_probe_modules()
    fn = _PROBES.get((op, backend))
    if fn is None:
        return f"{backend} backend for {op} is not built into this version"
    try:
        return fn(device_type)
    except Exception as exc:  # a probe must never take the program down
        return f"{type(exc).__name__}: {exc}"


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested(op: str) -> str:
    """The backend asked for by the environment: a backend name or 'auto'."""
    per_op = os.environ.get(f"FASTNEFES_{op.upper()}_BACKEND", "").strip().lower()
    if per_op:
        return per_op
    return os.environ.get("FASTNEFES_BACKEND", "auto").strip().lower() or "auto"


def resolve(op: str, device_type: str = "cpu") -> str:
    """The backend `op` uses on `device_type` ('cpu' / 'cuda'), given the environment."""
    choices = OPS[op]
    want = requested(op)
    if want not in ("auto", *choices):
        warn_once(f"{op}:bad:{want}", f"fastnefes: unknown {op} backend {want!r} (expected auto or one of {', '.join(choices)}); using auto")
        want = "auto"
    if want != "auto":
        reason = _probe(op, want, device_type)
        if reason is None:
            return want
        warn_once(f"{op}:{want}:{device_type}", f"fastnefes: {op} backend {want!r} unavailable on {device_type} ({reason}); falling back to the best available")
    reasons = []
    for backend in choices:
        reason = _probe(op, backend, device_type)
        if reason is None:
            return backend
        reasons.append(f"{backend}: {reason}")
    return "torch"  # unreachable: torch always probes available


def report(device_type: str = "cpu") -> list[dict]:
    """For `fastnefes doctor`: per op, the chosen backend and why each better one is not used."""
    rows = []
    for op, choices in OPS.items():
        chosen = resolve(op, device_type)
        unavailable = {b: _probe(op, b, device_type) for b in choices if b != "torch"}
        rows.append({"op": op, "device": device_type, "backend": chosen, "requested": requested(op),
                     "unavailable": {b: r for b, r in unavailable.items() if r}})
    return rows
