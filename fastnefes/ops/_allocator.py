"""Keep freed memory in the process heap (glibc), so big per-step buffers are not page-faulted afresh.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmaps and gives
them back to the system on free, so every training step or refinement iteration pays page faults
again for each gradient buffer of tens of MB (on the 2-core benchmark machine that took 75 % of a
D = 128 compositing backward, torch and native alike). Raising the mmap and trim thresholds keeps
those pages mapped and reused, as PyTorch's recommended jemalloc / tcmalloc setups do.
Process-wide, so it is opt-in: the CLI and the benchmarks call it; FASTNEFES_ALLOCATOR=system
leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied: list[bool] = []


def keep_freed_memory_in_heap(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 32,
                              top_pad: int = 1 << 28) -> bool:
    """Set glibc's malloc thresholds (bytes) once per process; True when they are in effect.

    A no-op returning False off Linux/glibc or with FASTNEFES_ALLOCATOR=system.
    """
    if _applied:
        return _applied[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("FASTNEFES_ALLOCATOR", "").lower() != "system":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # mallopt takes an int: cap at INT_MAX.
            cap = (1 << 31) - 1
            ok = all(mallopt(opt, min(value, cap)) == 1 for opt, value in (
                (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
        except (OSError, AttributeError):
            ok = False
    _applied.append(ok)
    return ok
