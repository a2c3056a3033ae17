"""Host time against GPU time of a compiled call: whether it is host-bound, and what CUDA graphs could give.

``measure(call)`` (CUDA only; None elsewhere) times ``reps`` calls after one
warm-up:

- ``host_ms``: how long the call takes to return, the GPU idle before it
  (Python, guards, wrappers, kernel launches);
- ``wall_ms``: the call until its GPU work is done (what a user sees);
- ``gpu_ms``: the GPU's own time, each call queued behind a sleep kernel so
  its launches are all in before its first kernel starts: no launch gaps.
  None when a sleep ended before the launches were in (one call's launches
  fill the launch queue, or the call waits for the GPU): the figure would
  count the gaps.

``verdict(t)`` says it in one line. Host-bound means the host takes longer to
launch the work than the GPU takes to run it; CUDA graphs (``mode=
"reduce-overhead"``) replay the launches at once, so a call could come near
``gpu_ms``::

    wall 2.31 ms per call: host 2.25 ms, GPU 0.62 ms -> host-bound; mode="reduce-overhead" could bring it
    near 0.62 ms (up to 3.7x)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class HostGpu:
    host_ms: float
    gpu_ms: Optional[float]
    wall_ms: float


def measure(call: Callable[[], object], device=None, reps: int = 10) -> Optional[HostGpu]:
    """Host, GPU and wall time per call of ``call`` on CUDA ``device`` (default: the current one); None
    without CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        return _measure(call, reps)


def _measure(call: Callable[[], object], reps: int) -> HostGpu:
    call()
    torch.cuda.synchronize()
    host = wall = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host, wall = host + t1 - t0, wall + time.perf_counter() - t0
    # One call at a time behind its own sleep: ten calls queued at once can hold more launches than the
    # launch queue takes, and the host then waits for the GPU (the figure would count the gaps).
    gpu, queued = 0.0, True
    rate_khz = torch.cuda.get_device_properties(torch.cuda.current_device()).clock_rate or 1_500_000
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int((2 * host / reps * 1e3 + 2) * rate_khz))  # longer than one call's launches (ms*kHz)
        start.record()
        call()
        end.record()
        queued = queued and not start.query()  # the sleep still ran: the call's launches were all in first
        end.synchronize()
        gpu += start.elapsed_time(end)
    return HostGpu(host / reps * 1e3, gpu / reps if queued else None, wall / reps * 1e3)


def verdict(t: HostGpu) -> str:
    """One line: the three times, and whether the call is host-bound and by how much CUDA graphs could help."""
    if t.gpu_ms is None:
        return (f"wall {t.wall_ms:.2f} ms per call: host {t.host_ms:.2f} ms; GPU time not measured (the launches "
                "did not all queue before the GPU started: too many, or a call waits for the GPU)")
    line = f"wall {t.wall_ms:.2f} ms per call: host {t.host_ms:.2f} ms, GPU {t.gpu_ms:.2f} ms"
    if t.host_ms >= t.gpu_ms and t.gpu_ms > 0:
        return (line + f" -> host-bound; mode=\"reduce-overhead\" could bring it near {t.gpu_ms:.2f} ms "
                f"(up to {t.wall_ms / t.gpu_ms:.1f}x)")
    return line + " -> GPU-bound: CUDA graphs would save little"
