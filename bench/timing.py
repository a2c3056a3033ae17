"""Timing: warm-up, many repetitions, the median and its 95% confidence interval.

On CUDA each repetition is timed with CUDA events around the call, and the L2
cache is flushed before it (a 256 MiB write), so repeated runs over the same
inputs do not measure the cache. On the CPU, ``time.perf_counter`` around the
call. The interval is the distribution-free one for a median: order
statistics ``n/2 -+ 1.96 sqrt(n)/2``.

Two CUDA modes. ``latency`` (default, as ``triton.testing.do_bench``): the
events bracket one call, so when the CPU needs longer to launch the work
than the flush keeps the GPU busy (Dynamo guards, wrappers: ~0.1 ms for a
compiled graph), that wait is in the time. ``gpu`` (``hide_launch``): a
``torch.cuda._sleep`` longer than the call's measured launch time is queued
before the start event, so the work is all queued when the GPU reaches it
and the events time the GPU work alone, as in a steady training loop where
the CPU runs ahead.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    ci_low_ms: float
    ci_high_ms: float
    reps: int
    samples: list = field(default_factory=list, repr=False)  # every repetition, ms (pooled across rounds)

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "ci95_ms": [self.ci_low_ms, self.ci_high_ms], "reps": self.reps}


def median_ci(samples: list[float]) -> Timing:
    xs = sorted(samples)
    n = len(xs)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    mid = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    return Timing(mid, xs[lo], xs[hi], n, list(samples))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


SLEEP_CYCLES_PER_MS = 2.0e6  # about an H100's SM clock; a longer sleep only costs wall time


def host_per_call(fn: Callable[[], object], reps: int = 20) -> tuple[float, float]:
    """(host ms per call while enqueueing, synchronized wall ms per call) on CUDA, after 3 warm-up calls:
    where host time nears wall time, the calls are launch-bound. Diagnostics (``scripts/gpu_*_overhead.py``)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    return host * 1e3, (time.perf_counter() - start) / reps * 1e3


def wall_and_queued(fn: Callable[[], object], reps: int = 20) -> tuple[float, float]:
    """(median synchronized wall ms, median host ms to queue) of ``fn()`` on CUDA, the GPU drained before each
    call: a call queued in about its wall time is host-bound. Diagnostics (``scripts/gpu_*_host*.py``)."""
    wall, queue = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        queue.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
    return statistics.median(wall), statistics.median(queue)


def time_fn(fn: Callable[[], object], device: str, reps: int, warmup: int = 3,
            budget_s: float = 10.0, hide_launch: bool = False) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls (fewer if over ``budget_s``)."""
    launch_ms = 0.0
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        launch_ms = max(launch_ms, (time.perf_counter() - t0) * 1e3)  # CPU time to queue the work
    _sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
        sleep = int(min(2 * launch_ms + 0.5, 200.0) * SLEEP_CYCLES_PER_MS)
        for _ in range(reps):
            flush.zero_()
            if hide_launch:
                torch.cuda._sleep(sleep)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
            if time.perf_counter() - start_all > budget_s and len(samples) >= 5:
                break
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start_all > budget_s and len(samples) >= 5:
                break
    return median_ci(samples)
