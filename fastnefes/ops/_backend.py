"""Build and load the native kernels (csrc/) on first use, and register their backend probes.

Two builds, each a torch C++ extension compiled with `torch.utils.cpp_extension.load` into torch's
extension cache (`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) under a name that
also identifies the checkout (`_build_name`), rebuilt only when a source changes:
    fastnefes_native_cpu   C++ only (OpenMP): compositing, hash grid and occupancy march on CPU
                           tensors.
    fastnefes_native_cuda  the same plus the CUDA launchers of the same kernel bodies; made only
                           when torch is a CUDA build, a CUDA toolkit (nvcc) is found and a GPU is
                           visible. It serves CPU tensors too, so a CUDA machine compiles once.
Any build or load failure is remembered: one warning names the reason and the ops run their
pure-torch twins. The probes only check the cheap preconditions (sources, compiler, ninja, an
earlier failure), so `fastnefes doctor` never compiles unless asked (`--build`); the first op call
does the build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

from fastnefes.ops import backends

MODULE_NAMES = {"cpu": "fastnefes_native_cpu", "cuda": "fastnefes_native_cuda"}
_CPP_SOURCES = ("bindings.cpp", "composite_cpu.cpp", "hashgrid_cpu.cpp", "occgrid_cpu.cpp")
_CPU_ONLY_SOURCES = ("no_cuda.cpp",)  # raising CUDA entry points of the CPU-only build
_CUDA_SOURCES = ("composite_cuda.cu", "hashgrid_cuda.cu", "occgrid_cuda.cu")
# -O3 without -march: the cache may be shared by machines with different CPUs (CI runners);
# no FMA contraction, so products round as in the torch twins.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]

_lock = threading.RLock()
# build kind -> loaded module, or the reason it could not be built / loaded.
_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_build_seconds: dict[str, float] = {}
# device type -> the module serving it (None: torch path); the lock-free fast path of load_native.
_by_device: dict[str, ModuleType | None] = {}
_UNRESOLVED = object()


def csrc_dir() -> Path | None:
    """The kernel sources: `<repo>/csrc` in a checkout, `fastnefes/_csrc` in an installed wheel."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if all((candidate / name).is_file() for name in _CPP_SOURCES + _CPU_ONLY_SOURCES + _CUDA_SOURCES):
            return candidate
    return None


def _build_name(kind: str) -> str:
    """The build's name in the extension cache: one per kind and checkout (sources folder), so two
    checkouts sharing the cache (a CI copy and a working tree) do not rebuild over each other."""
    src = csrc_dir()
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:8] if src else "nosrc"
    return f"{MODULE_NAMES[kind]}_{digest}"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@functools.lru_cache(maxsize=None)
def _cuda_build_reason() -> str | None:
    """None if the CUDA build can be attempted, else why not."""
    import torch

    if not torch.version.cuda:
        return "torch is a CPU-only build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return "no CUDA toolkit found (set CUDA_HOME to a toolkit with bin/nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


@functools.lru_cache(maxsize=None)
def _precondition_reason() -> str | None:
    """None if a build can be attempted at all, else why not (cheap: no compilation)."""
    if csrc_dir() is None:
        return "kernel sources (csrc/) not found next to the package"
    if _compiler() is None:
        return "no C++ compiler found (set CXX or install g++)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _preferred_kind() -> str:
    return "cuda" if _cuda_build_reason() is None else "cpu"


def _build(kind: str, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    src = csrc_dir()
    assert src is not None
    sources = [str(src / name) for name in _CPP_SOURCES + (_CUDA_SOURCES if kind == "cuda" else _CPU_ONLY_SOURCES)]
    return cpp_extension.load(
        name=_build_name(kind),
        sources=sources,
        extra_cflags=_CFLAGS,
        extra_cuda_cflags=_CUDA_CFLAGS if kind == "cuda" else None,
        extra_ldflags=_LDFLAGS,
        with_cuda=kind == "cuda",
        verbose=verbose,
    )


def _first_error_line(exc: Exception) -> str:
    """The compiler's first error line from a build exception (its message holds the whole log)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line[:300]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def _load_kind(kind: str, verbose: bool = False) -> ModuleType | None:
    """Build (if needed) and import one build kind; failures are remembered, not retried."""
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _errors:
            return None
        reason = _precondition_reason() or (_cuda_build_reason() if kind == "cuda" else None)
        if reason is None:
            start = time.perf_counter()
            try:
                _modules[kind] = _build(kind, verbose)
            except Exception as exc:  # compiler errors, missing headers, import errors: fall back
                reason = f"{MODULE_NAMES[kind]} build failed: {_first_error_line(exc)}"
            _build_seconds[kind] = time.perf_counter() - start
        if reason is not None:
            _errors[kind] = reason
            backends.forget_probes()  # availability changed: doctor and resolve must see it
            backends.warn_once(f"native:{kind}", f"fastnefes: native kernels unavailable ({reason}); "
                               "using the pure-torch ops")
            return None
        return _modules[kind]


def _module_for(device_type: str) -> ModuleType | None:
    if device_type == "cuda":
        return _load_kind("cuda")
    if device_type != "cpu":
        return None
    if _preferred_kind() == "cuda":
        module = _load_kind("cuda")  # serves CPU tensors too
        if module is not None:
            return module
    return _load_kind("cpu")


def load_native(device_type: str) -> ModuleType | None:
    """The native module serving tensors on `device_type` ('cpu' / 'cuda'), or None (torch path).

    Builds on first call (a minute or two on two cores), then returns the cached module.
    """
    module = _by_device.get(device_type, _UNRESOLVED)
    if module is _UNRESOLVED:
        with _lock:
            module = _by_device.get(device_type, _UNRESOLVED)
            if module is _UNRESOLVED:
                module = _by_device[device_type] = _module_for(device_type)
    return module


def is_loaded(device_type: str) -> bool:
    """Whether this process has already built / loaded a native module serving `device_type` (the
    CUDA build serves CPU tensors too)."""
    return _by_device.get(device_type) is not None or "cuda" in _modules or (device_type == "cpu" and "cpu" in _modules)


def _unavailable(device_type: str) -> str | None:
    """Why the native kernels cannot serve `device_type`, without compiling anything (cached checks:
    resolve() calls this on every op call)."""
    if device_type not in ("cpu", "cuda"):
        return f"no native kernels for device {device_type!r}"
    if _by_device.get(device_type) is not None:
        return None
    if device_type == "cuda":
        return _errors.get("cuda") or _precondition_reason() or _cuda_build_reason()
    with _lock:
        if "cpu" in _errors and ("cuda" in _errors or _preferred_kind() == "cpu"):
            return _errors["cpu"]
    return _precondition_reason()


# Every native op has a CPU and a CUDA launcher of one kernel body: one probe serves them all.
for _op in ("composite", "hashgrid", "occgrid"):
    backends.register_probe(_op, "native", _unavailable)


def _build_directory(kind: str) -> str:
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(_build_name(kind), verbose=False)


def native_status() -> dict[str, str]:
    """For `fastnefes doctor`: sources, toolchain, and the state of each build (compiles nothing)."""
    src = csrc_dir()
    status = {
        "sources": str(src) if src else "not found",
        "C++ compiler": _compiler() or "not found",
        "build cache": str(Path(_build_directory("cpu")).parent),
        "CUDA build": _cuda_build_reason() or "possible",
    }
    for kind, name in MODULE_NAMES.items():
        if kind in _modules:
            seconds = _build_seconds.get(kind, 0.0)
            state = f"loaded from {_build_directory(kind)} ({seconds:.1f} s to build/load)"
        elif kind in _errors:
            state = f"failed: {_errors[kind]}"
        else:
            state = "not built in this process (builds on first use, or `fastnefes doctor --build`)"
        status[name] = state
    return status


def build_native(verbose: bool = False) -> dict[str, str]:
    """Build (or load from the cache) every build this machine supports now; report the outcome."""
    kinds = ["cuda", "cpu"] if _preferred_kind() == "cuda" else ["cpu"]
    for kind in kinds:
        if _load_kind(kind, verbose=verbose) is not None:
            break  # the CUDA build serves CPU tensors too
    status = native_status()
    for kind in kinds:
        name = MODULE_NAMES[kind]
        if kind in _modules:
            status[name] = f"ok: {_build_directory(kind)} ({_build_seconds[kind]:.1f} s)"
    if _preferred_kind() == "cpu":
        status[MODULE_NAMES["cuda"]] = f"skipped: {_cuda_build_reason()}"
    return status
