"""Hash-grid configuration as plain data, with tiny-cuda-nn's level layout.

The layout follows tiny-cuda-nn's `GridEncodingTemplated` (include/tiny-cuda-nn/encodings/grid.h,
common_device.h) so one parameter vector means the same thing on every backend:

- scale_l = exp2f(l * log2f(per_level_scale)) * base_resolution - 1   (float32 arithmetic)
- res_l   = ceil(scale_l) + 1
- size_l  = min(next_multiple(res_l^3, 8), 2^log2_hashmap_size)   entries
- level l is dense (index x + y*res + z*res^2) iff size_l >= res_l^3, else hashed
  (tcnn hashes when `hashmap_size < stride`, stride being the un-rounded res^3)
- offsets are cumulative in entries; the flat vector is entry-major, features innermost:
  params[(offset_l + index) * F + f]; output column = l * F + f.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from fastnefes.errors import FastnefesError

# tcnn compiles grid kernels for these feature counts only.
_TCNN_FEATURES_PER_LEVEL = (1, 2, 4, 8)
# tcnn's MAX_N_LEVELS.
_MAX_LEVELS = 128


class GridLevel(NamedTuple):
    """One level of the grid: float32 scale, vertices per axis, table entries, first entry, dense?"""

    scale: float
    resolution: int
    size: int
    offset: int
    dense: bool


@dataclass
class HashGridConfig:
    """Multiresolution hash grid over [0, 1]^3, tiny-cuda-nn 'HashGrid' semantics."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 2.0

    def __post_init__(self) -> None:
        checks = (
            (isinstance(self.n_levels, int) and 1 <= self.n_levels <= _MAX_LEVELS, f"n_levels in 1..{_MAX_LEVELS}"),
            (self.n_features_per_level in _TCNN_FEATURES_PER_LEVEL, "n_features_per_level in (1, 2, 4, 8)"),
            (isinstance(self.log2_hashmap_size, int) and 3 <= self.log2_hashmap_size <= 30, "log2_hashmap_size in 3..30"),
            (isinstance(self.base_resolution, int) and self.base_resolution >= 1, "base_resolution >= 1"),
            (isinstance(self.per_level_scale, (int, float)) and math.isfinite(self.per_level_scale)
             and self.per_level_scale >= 1.0, "per_level_scale >= 1"),
        )
        for ok, expected in checks:
            if not ok:
                raise FastnefesError(f"hash grid config {asdict(self)}: expected {expected}")
        self.per_level_scale = float(self.per_level_scale)

    def to_tcnn(self) -> dict[str, Any]:
        """The tiny-cuda-nn encoding config dict."""
        return {"otype": "HashGrid", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HashGridConfig":
        """From `to_tcnn()` / `asdict()` output; missing keys take defaults, unknown keys are errors."""
        if not isinstance(d, dict):
            raise FastnefesError(f"hash grid config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        otype = d.pop("otype", "HashGrid")
        if otype not in ("HashGrid", "Grid"):
            raise FastnefesError(f"hash grid config: otype {otype!r}, expected 'HashGrid'")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FastnefesError(f"hash grid config: unknown keys {unknown}, expected some of {sorted(names)}")
        return cls(**d)

    def levels(self) -> list[GridLevel]:
        """Per-level (scale, resolution, size, offset, dense) exactly as tiny-cuda-nn lays them out."""
        return list(_grid_levels(self.n_levels, self.log2_hashmap_size, self.base_resolution, self.per_level_scale))

    @property
    def n_entries(self) -> int:
        """Total table entries over all levels."""
        last = self.levels()[-1]
        return last.offset + last.size

    @property
    def n_params(self) -> int:
        return self.n_entries * self.n_features_per_level

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level


@functools.lru_cache(maxsize=64)
def _grid_levels(n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float) -> tuple[GridLevel, ...]:
    # float32 throughout, as tcnn's grid_scale(): exp2f(l * log2f(s)) * base - 1.0f
    log2_scale = np.log2(np.float32(per_level_scale))
    table = 1 << log2_hashmap_size
    out, offset = [], 0
    for level in range(n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0))
        resolution = int(math.ceil(float(scale))) + 1
        dense_entries = resolution**3
        size = min(-(-dense_entries // 8) * 8, table)
        out.append(GridLevel(float(scale), resolution, size, offset, size >= dense_entries))
        offset += size
    return tuple(out)
