"""Refinement sharded over processes and machines (torchrun): whole batches per rank.

    torchrun --nproc-per-node 2 -m fastnefes refine RUN --data DATA --init init.txt --out refined.txt

Each rank loads the run once and refines whole batches of the queries, cut exactly as a single
process cuts them (`batch` consecutive queries of the init file; batch k goes to rank
k % world_size), so every query is refined in the same company as in a single-process run and
the poses are the same. Rank 0 gathers the parts and writes the outputs. gloo on CPU, NCCL on
GPUs with one device per rank (LOCAL_RANK).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from fastnefes.errors import FastnefesError
from fastnefes.refine.pipeline import SplitRefinement, match_init_to_split, refine_split

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local_rank>"
    backend: str  # "gloo" or "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def start_shard(requested: bool, device: str = "auto") -> Optional[Shard]:
    """Join the process group when launched by torchrun with more than one rank (or when
    `requested`, e.g. `--distributed`); None for a plain single-process run.

    On CPU each rank gets cpu_count / local ranks intra-op threads unless OMP_NUM_THREADS is set
    (torchrun sets it to 1 when it starts several ranks on a node)."""
    import torch
    import torch.distributed as dist

    from fastnefes.train.trainer import resolve_device

    if not launched_by_torchrun():
        if requested:
            raise FastnefesError("--distributed: not launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR unset); "
                                 "run `torchrun --nproc-per-node N -m fastnefes refine ...`")
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < 2 and not requested:
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if resolve_device(device).type == "cuda":
        if torch.cuda.device_count() < local_world:
            raise FastnefesError(f"--device {device}: {local_world} ranks on this node but "
                                 f"{torch.cuda.device_count()} CUDA devices (one per rank)")
        torch.cuda.set_device(local_rank)
        name, backend = f"cuda:{local_rank}", "nccl"
    else:
        name, backend = "cpu", "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)
    return Shard(rank, world, local_rank, name, backend)


def shard_names(names: list[str], batch: int, rank: int, world_size: int) -> list[str]:
    """The names of `rank`'s whole batches: names cut into runs of `batch` as refine_split cuts
    them, run k to rank k % world_size. Only the last run can be short and it is its rank's
    last, so refine_split cuts a rank's list into the same runs again."""
    batch = max(1, batch)
    runs = [names[lo : lo + batch] for lo in range(0, len(names), batch)]
    return [n for run in runs[rank::world_size] for n in run]


def refine_split_sharded(shard: Shard, model, scene, split: str, init: dict[str, np.ndarray], config, batch: int = 1,
                         apr=None, init_path="init", on_progress: Optional[Callable[[int], None]] = None
                         ) -> Optional[SplitRefinement]:
    """refine_split over the ranks: the whole SplitRefinement, in init order, on rank 0; None on
    the others. A rank's error is raised on rank 0 (and on that rank)."""
    import torch.distributed as dist

    match_init_to_split(scene, split, init, init_path)  # every rank checks every name: all fail alike
    names = list(init)
    mine = shard_names(names, batch, shard.rank, shard.world_size)
    error: Optional[str] = None
    part = None
    try:
        part = refine_split(model, scene, split, {n: init[n] for n in mine}, config, batch=batch, apr=apr,
                            init_path=init_path, on_progress=on_progress)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, then raised here too
        error = f"rank {shard.rank}: {exc}" if isinstance(exc, FastnefesError) else f"rank {shard.rank}: {type(exc).__name__}: {exc}"
        if not shard.is_main:
            dist.gather_object((None, error), None, dst=0)
            raise
    payload = (None if part is None else (part.names, part.init, part.refined, part.diagnostics), error)
    parts = [None] * shard.world_size if shard.is_main else None
    dist.gather_object(payload, parts, dst=0)
    if not shard.is_main:
        return None
    errors = [e for _, e in parts if e]
    if errors:
        raise FastnefesError(f"sharded refinement failed on {len(errors)} rank(s): {errors[0]}")
    init_of, refined, diagnostics = {}, {}, {}
    for (part_names, part_init, part_refined, part_diags), _ in parts:
        init_of.update(part_init)
        refined.update(part_refined)
        diagnostics.update(zip(part_names, part_diags))
    if on_progress:
        on_progress(len(names))
    return SplitRefinement(names, {n: init_of[n] for n in names}, {n: refined[n] for n in names},
                           [diagnostics[n] for n in names])
