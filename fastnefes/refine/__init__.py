"""Test-time refinement: poses (or APR weights) against a trained feature field."""

from fastnefes.refine.config import RefineConfig
from fastnefes.refine.pipeline import SplitRefinement, refine_split
from fastnefes.refine.refiner import QueryDiagnostics, RefineResult, Refiner

__all__ = ["RefineConfig", "SplitRefinement", "refine_split", "QueryDiagnostics", "RefineResult", "Refiner"]
