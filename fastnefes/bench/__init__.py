"""Benchmarks users run on their own scene: `fastnefes bench train` and `fastnefes bench refine`."""

from fastnefes.bench.refine_bench import RefineBenchConfig, bench_refine
from fastnefes.bench.train_bench import TrainBenchConfig, bench_train

__all__ = ["RefineBenchConfig", "TrainBenchConfig", "bench_refine", "bench_train"]
