"""Hot kernels behind one function each, with the backend chosen at run time (see backends)."""

from __future__ import annotations

from fastnefes.ops.composite import CompositeOutput, composite
from fastnefes.ops.hashgrid import HashGridConfig, HashGridEncoding, hash_grid_encode
from fastnefes.ops.occgrid import OccupancyGrid

__all__ = ["CompositeOutput", "HashGridConfig", "HashGridEncoding", "OccupancyGrid", "composite", "hash_grid_encode"]
