"""Named timing sections for per-stage breakdowns (`fastnefes bench refine`).

Pipelines mark their stages with `with section("sampling"): ...`; that costs one list check
unless a SectionTimer is active, in which case each section's wall time is added to the timer
(CUDA is synchronised before reading the clock, so asynchronous kernels land in their section).
Sections must not nest: each one's time is exclusive by construction of the call sites.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_active: list["SectionTimer"] = []


class SectionTimer:
    """Accumulates seconds per section name while active (`with SectionTimer(device) as t:`)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.sync = device is not None and torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}

    def synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    def __enter__(self) -> "SectionTimer":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def reset(self) -> None:
        self.totals = {}


@contextmanager
def section(name: str) -> Iterator[None]:
    """Time the block under `name` in the active SectionTimer (no-op when none is active)."""
    if not _active:
        yield
        return
    timer = _active[-1]
    timer.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        timer.synchronize()
        timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - start
