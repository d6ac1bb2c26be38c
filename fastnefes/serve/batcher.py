"""Dynamic batching: queries arriving together are refined as one batch, each answered alone.

One worker thread owns the model. It takes the oldest waiting query, gathers more for up to
`max_wait_s` after it took that query or until `max_batch` are waiting, splits what it gathered
into groups that can share one batched render (same image size, same settings) and refines each
group with one `Refiner.refine` call. A group that raises is refined again query by query, so one
bad query never fails the others. Each query's answer is a concurrent.futures.Future.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastnefes.refine.config import RefineConfig
from fastnefes.refine.result import RefineResult

# refine(config, images [B,H,W,3] uint8, K [B,3,3], init_c2w [B,4,4]) -> RefineResult
RefineFn = Callable[[RefineConfig, np.ndarray, np.ndarray, np.ndarray], RefineResult]


@dataclass
class Job:
    image: np.ndarray  # [H, W, 3] uint8
    K: np.ndarray  # [3, 3]
    c2w: np.ndarray  # [4, 4] initial camera-to-world
    config: RefineConfig
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one batched render."""
        return self.image.shape, json.dumps(self.config.to_dict(), sort_keys=True)


@dataclass
class Answer:
    """One query's share of a batch: its result (a RefineResult with one row) and timings."""

    result: RefineResult
    queue_s: float  # from arrival to the start of its batch's refinement
    refine_s: float  # the batch's refinement
    batch_size: int


class DynamicBatcher:
    def __init__(self, refine: RefineFn, max_batch: int = 8, max_wait_s: float = 0.01):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.refine, self.max_batch, self.max_wait_s = refine, max_batch, max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()  # refined group size -> count
        self.gathered_sizes: Counter[int] = Counter()  # queries gathered per wake-up -> count
        self.answered = 0
        self.errors = 0  # queries whose refinement raised (answered with an error)
        self.cancelled = 0  # queries dropped because their caller had given up
        self.in_flight = 0

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Refine on a thread of its own (see run)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="fastnefes-batcher", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Refine queries in the calling thread until stop(). On a CPU, call it from the thread
        that loaded the model and has run torch's parallel kernels: each thread that starts
        them gets its own OpenMP team, and with two teams on the cores each parallel region of
        the refining one runs several times slower (measured: a batch of 8 took 2x as long on a
        second thread; docs/serving.md)."""
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            # A job whose caller gave up (its future cancelled) is dropped; the others can no
            # longer be cancelled, so their answers always land.
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            with self._lock:
                self.gathered_sizes[len(jobs)] += 1
                self.cancelled += len(jobs) - len(live)
                self.in_flight -= len(jobs) - len(live)
            groups: dict[tuple, list[Job]] = {}
            for job in live:
                groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self._refine_group(group)

    def stop(self, timeout: float = 30.0) -> None:
        """End run() (after the queries already queued); joins start()'s thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, image: np.ndarray, K: np.ndarray, c2w: np.ndarray, config: RefineConfig) -> Future:
        """Queue one query; the future resolves to an Answer (or raises what refinement raised)."""
        job = Job(image, K, c2w, config)
        with self._lock:
            self.in_flight += 1
        self._queue.put(job)
        return job.future

    def counters(self) -> dict:
        with self._lock:
            groups = sum(self.batch_sizes.values())
            refined = sum(k * v for k, v in self.batch_sizes.items())
            return {
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1e3,
                "queued": self._queue.qsize(), "in_flight": self.in_flight, "answered": self.answered,
                "errors": self.errors, "cancelled": self.cancelled, "batches": groups, "queries_refined": refined,
                "mean_batch_size": refined / groups if groups else 0.0,
                "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "gathered_sizes": {str(k): v for k, v in sorted(self.gathered_sizes.items())},
            }

    # -- the worker -------------------------------------------------------------------------
    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """first plus whatever arrives within max_wait_s of the worker taking it, up to max_batch
        jobs; (jobs, whether a stop was requested meanwhile). The window opens when the worker
        is free, not when first arrived: the clients the last batch answered send their next
        queries within it, so closed-loop clients share one batch instead of settling into
        groups that alternate (first may have queued for a whole batch; max_wait_s more is small)."""
        jobs, deadline = [first], time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:  # past the deadline, still take what is already waiting (no blocking)
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _refine_group(self, group: list[Job]) -> None:
        start = time.perf_counter()
        try:
            result = self.refine(group[0].config, np.stack([j.image for j in group]), np.stack([j.K for j in group]),
                                 np.stack([j.c2w for j in group]))
            if len(result.poses) != len(group) or len(result.diagnostics) != len(group):
                raise RuntimeError(f"refinement answered {len(result.poses)} poses for {len(group)} queries")
        except Exception as exc:  # noqa: BLE001 - answered per query below
            if len(group) > 1:  # find the query at fault: the others still get their answers
                for job in group:
                    self._refine_group([job])
                return
            self._finish(group[0], exc=exc)
            return
        refine_s = time.perf_counter() - start
        with self._lock:
            self.batch_sizes[len(group)] += 1
        for i, job in enumerate(group):
            one = RefineResult(result.poses[i : i + 1], result.initial[i : i + 1], result.diagnostics[i : i + 1])
            self._finish(job, Answer(one, start - job.arrived, refine_s, len(group)))

    def _finish(self, job: Job, answer: Answer | None = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self.in_flight -= 1
            self.answered += 1
            self.errors += exc is not None
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(answer)
