"""Timing: warm-up, many repetitions, the median and its 95% confidence interval.

On CUDA each repetition is timed with CUDA events around the call, and the L2
cache is flushed before it (a 256 MiB write), so repeated runs over the same
inputs do not measure the cache. On the CPU, ``time.perf_counter`` around the
call. The interval is the distribution-free one for a median: order
statistics ``n/2 -+ 1.96 sqrt(n)/2``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    ci_low_ms: float
    ci_high_ms: float
    reps: int

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "ci95_ms": [self.ci_low_ms, self.ci_high_ms], "reps": self.reps}


def median_ci(samples: list[float]) -> Timing:
    xs = sorted(samples)
    n = len(xs)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    mid = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    return Timing(mid, xs[lo], xs[hi], n)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, reps: int, warmup: int = 3,
            budget_s: float = 10.0) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls (fewer if over ``budget_s``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
        for _ in range(reps):
            flush.zero_()
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
