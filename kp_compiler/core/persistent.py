"""Device tensors kept between calls, allocated outside any CUDA-graph memory pool.

Under ``mode="reduce-overhead"`` Inductor's CUDA-graph trees route every
allocation of the calling thread into the graphs' private pool, warm-up runs
included. A cache that keeps a tensor made there (a kernel's table of expert
weight addresses, a block mask, a quantized weight) holds pool memory the
trees do not track: they stop with "tensor(s) in the cudagraph pool not
tracked as outputs", and a pool that reuses the memory would overwrite it.

``persistent(make)`` runs ``make`` on a worker thread, whose allocations go to
the ordinary caching allocator. The worker runs it on the caller's current
stream, so the allocation belongs to that stream (as if the caller had made
it: a block freed later is not reused under kernels still reading it) and
the caller's later kernels are ordered after ``make``'s. Under a stream
capture (``capturing()``) there is no safe place: callers build the value in
the graph and do not cache it; a host-to-device copy there goes through
``to_device`` (CUDA captures copies only from pinned host memory).

Before::   tables = torch.tensor(addresses).to(device)          # in the pool during warm-up
After::    tables = persistent(lambda: torch.tensor(addresses).to(device))
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Optional

import torch

_worker: Optional[concurrent.futures.ThreadPoolExecutor] = None


def capturing() -> bool:
    """A CUDA stream capture is running on this thread's current stream."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


_PINNED: list = []  # host tensors that captured copies read at every replay


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """``host.to(device)``, also under a stream capture, where CUDA copies only from pinned host memory: there
    the copy is captured from a pinned copy of ``host``, kept for the process (the graph's replays read it)."""
    if capturing():
        pinned = host.pin_memory()
        _PINNED.append(pinned)
        return pinned.to(device, non_blocking=True)
    return host.to(device)


def persistent(make: Callable[[], Any]) -> Any:
    """``make()``, with its CUDA allocations outside any pool the calling thread allocates into.

    The worker runs it in the caller's grad and inference modes. It runs here instead where the worker
    could deadlock: on the worker itself (a nested call), or while this thread holds Dynamo's compile lock
    (``make`` might compile, and the worker would wait for the lock); no pool routes a compile's allocations.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()) or _on_worker() or _compiling():
        return make()
    global _worker
    if _worker is None:
        _worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kp-persistent")
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run():
        _local.worker = True
        torch.cuda.set_device(device)
        # inference_mode(False) would turn grad mode on: grad mode is set inside it
        with torch.cuda.stream(stream), torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return make()
    return _worker.submit(run).result()


_local = threading.local()


def _on_worker() -> bool:
    return getattr(_local, "worker", False)


def _compiling() -> bool:
    try:
        from torch._dynamo.convert_frame import compile_lock

        return bool(compile_lock._is_owned())
    except (ImportError, AttributeError):  # another torch: no such lock to hold
        return False
