"""Batch buckets replayed as captured graphs (CUDA graphs on NVIDIA GPUs).

``GraphBuckets(fn, proof, sizes, recorder)`` does what ``buckets.Bucketed``
does, with one captured graph per bucket instead of a call:

- on the first call that lands in a bucket, the batched inputs are copied into
  static buffers of the bucket's size (zeros past the real rows), ``fn`` runs
  once as a warm-up (compiling, autotuning), then once under capture. Kernels
  launched under capture do not run, so the captured outputs hold nothing
  until a replay: this call returns the warm-up's outputs, and the graph ran
  once, as the call asked (a replay on top would write into a buffer twice);
- later calls copy their real rows into the static buffers and replay; rows
  past ``n`` keep whatever an earlier call left there, which the proof says
  reaches no real row;
- outputs are the captured graph's static tensors, so each is narrowed to the
  real rows and cloned before it is returned (the next replay overwrites them);
- tensor inputs without batch rows (parameters, buffers) are read where they
  are: the graph is captured against their addresses, and a call where one
  moved captures the bucket again;
- every bucket captures into one memory pool (``recorder.pool``), shared with
  every bucketed graph of the device and thread (``shared_recorder``);
  ``capture_all`` captures every bucket up front, the largest first, so the
  smaller ones reuse its memory (each bucket's warm-up runs the graph once:
  a graph that writes into a buffer writes once per bucket);
- a batch above the largest bucket runs ``fn`` as it is.

``recorder.capture(fn)`` returns ``(graph, static outputs, warm-up outputs)``.
``CudaRecorder`` captures with ``torch.cuda.CUDAGraph``. ``EagerRecorder`` is
its stand-in on any device, which is how the CPU tests check the buffer
handling: the warm-up runs ``fn``; the "capture" runs nothing and makes static
outputs that hold no results (NaN, -7, or the negation for bools), so a
missing replay shows; a replay runs ``fn`` and copies its results into them.
``pool_bytes()``: ``CudaRecorder`` sums the pool's segments (None for the
stand-in); ``stats["pool_bytes"]`` keeps it after each capture. ``stats``
counts captures, replays and runs above the largest.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.rows import RowProof
from .buckets import Bucketed


class EagerRecorder:
    """A stand-in for CUDA graphs on any device: replay reruns the function into the captured outputs."""

    pool = None

    def __init__(self, device: "torch.device | None" = None):
        self.device = device

    def pool_bytes(self) -> Optional[int]:
        return None

    def capture(self, fn: Callable) -> tuple:
        warm = fn()
        flat = [_no_result(o) for o in _flat(warm)]  # a capture runs nothing: no results until a replay
        outs = type(warm)(flat) if isinstance(warm, (list, tuple)) else flat[0]

        class Replay:
            def replay(self) -> None:
                for dst, src in zip(_flat(outs), _flat(fn())):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src)
        return Replay(), outs, warm


def _no_result(o: Any) -> Any:
    if not isinstance(o, torch.Tensor):
        return o
    if o.dtype == torch.bool:
        return torch.logical_not(o)
    return torch.full_like(o, float("nan") if o.is_floating_point() or o.is_complex() else -7)


class CudaRecorder:
    """``torch.cuda.CUDAGraph`` capture into one pool, after a warm-up on one side stream.

    ``shared_recorder`` hands every bucketed graph of a device and thread the same recorder: one pool and
    one warm-up stream. A new stream per warm-up cost a cuBLAS workspace per stream, kept for the process
    (32 MiB each on the H200: ten captures held 0.32 GiB more than Inductor's CUDA graphs). One pool is
    safe because replays of one thread run in order on its stream and every output is cloned right
    after its replay: a graph's intermediates are dead when the next graph reuses their memory, and its
    static outputs stay allocated (the captured entry holds them)."""

    def __init__(self, device: "torch.device | None" = None):
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None or device.index is None
                                   else device.index)
        with torch.cuda.device(self.device):
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream()
        self._keep_pool = None

    def pool_bytes(self) -> Optional[int]:
        """Bytes the caching allocator holds in this pool's segments (``memory_snapshot``'s pool ids)."""
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == tuple(self.pool))

    def capture(self, fn: Callable) -> tuple:
        with torch.cuda.device(self.device):
            if self._keep_pool is None:
                # A pool lives while a graph captured into it does; once none does, a capture into it fails
                # ("use_count > 0" in the caching allocator: seen on the H200 when explain compiled the model
                # again after Dynamo's reset). An empty graph keeps it alive, as Inductor's cudagraph trees do.
                self._keep_pool = torch.cuda.CUDAGraph()
                with warnings.catch_warnings(), torch.cuda.graph(self._keep_pool, pool=self.pool):
                    warnings.simplefilter("ignore")  # "the CUDA Graph is empty"
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                warm = fn()
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outs = fn()
        return graph, outs, warm


_SHARED: dict = {}


def shared_recorder(device: torch.device, make: Callable = CudaRecorder):
    """The recorder of ``device`` for this thread (made by ``make(device)`` on first use)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), threading.get_ident())
    if key not in _SHARED:
        _SHARED[key] = make(device)
    return _SHARED[key]


def _flat(outs: Any) -> list:
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


class _Captured:
    def __init__(self, static_args: list, graph, outs, addresses: tuple):
        self.static_args, self.graph, self.outs, self.addresses = static_args, graph, outs, addresses


class GraphBuckets(Bucketed):
    """One captured graph per bucket; see the module docstring."""

    def __init__(self, fn: Callable, proof: RowProof, sizes: Sequence[int], recorder=None):
        super().__init__(fn, proof, sizes)
        self.recorder = recorder or EagerRecorder()
        self.captured: dict = {}
        self.stats.update(captures=0, replays=0)

    def _addresses(self, args: Sequence[Any]) -> tuple:
        """The data pointers of the inputs without batch rows (the graph reads them in place), and other args."""
        return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a
                     for i, (a, axis) in enumerate(zip(args, self.proof.inputs))
                     if axis is None and i not in self.proof.sizes)

    def __call__(self, *args: Any) -> Any:
        n, size = self.bucket(args)
        if size is None:
            return self.fn(*args)
        entry = self.captured.get(size)
        if entry is None or entry.addresses != self._addresses(args):
            entry, warm = self._capture(size, args, n, n)
            return self._narrow_clone(warm, n, size)  # the warm-up was this call's one run
        self._fill(entry.static_args, args, n, n)
        entry.graph.replay()
        self.stats["replays"] += 1
        return self._narrow_clone(entry.outs, n, size)

    def capture_all(self, args: Sequence[Any]) -> None:
        """Capture every bucket now, the largest first (smaller graphs then reuse its pool memory)."""
        batch = self.batch_of(args)
        for size in sorted(self.sizes, reverse=True):
            if size not in self.captured:
                self._capture(size, args, batch, min(batch, size))

    def _capture(self, size: int, args: Sequence[Any], batch: int, n: int) -> tuple:
        """``(entry, warm-up outputs)``; ``batch``: the batch ``args`` hold; ``n``: how many of its rows to copy
        in (at most ``size``)."""
        static = list(args)
        for i, (a, axis) in enumerate(zip(args, self.proof.inputs)):
            if axis is not None and isinstance(a, torch.Tensor):
                shape = list(a.shape)
                shape[axis] = a.shape[axis] // batch * size
                static[i] = a.new_zeros(shape)
        for i in self.proof.sizes:
            static[i] = size
        self._fill(static, args, batch, n)
        graph, outs, warm = self.recorder.capture(lambda: self.fn(*static))
        entry = _Captured(static, graph, outs, self._addresses(args))
        self.captured[size] = entry
        self.stats["captures"] += 1
        self.stats["pool_bytes"] = self.recorder.pool_bytes()
        return entry, warm

    def _fill(self, static: list, args: Sequence[Any], batch: int, n: int) -> None:
        """Copy the first ``n`` of ``batch`` rows of each batched input into its static buffer."""
        for i, (a, axis) in enumerate(zip(args, self.proof.inputs)):
            if axis is not None and isinstance(a, torch.Tensor):
                rows = a.shape[axis] // batch * n
                static[i].narrow(axis, 0, rows).copy_(a.narrow(axis, 0, rows))

    def _narrow_clone(self, outs: Any, n: int, size: int) -> Any:
        narrowed = self._narrow(outs, n, size)
        if isinstance(narrowed, (list, tuple)):
            cloned = [o.clone() if isinstance(o, torch.Tensor) else o for o in narrowed]
            return type(narrowed)(cloned) if isinstance(narrowed, tuple) else cloned
        return narrowed.clone() if isinstance(narrowed, torch.Tensor) else narrowed
