"""Batch buckets: a graph compiled once for a symbolic batch, run at a few fixed batch sizes.

``Bucketed(fn, proof, sizes)`` wraps a compiled graph whose rows were proven
independent along the batch (``core/rows.py``). A call with batch ``n`` pads
every batched input to the smallest bucket ``>= n`` (rows after ``n`` are
zeros), passes the bucket as the batch size where Dynamo hands the size in,
runs, and returns each batched output sliced to its first ``n`` rows. A batch
above the largest bucket runs the graph at its own size (it was compiled with a
symbolic batch). On CUDA each bucket is where a CUDA graph is captured and
replayed (the padded inputs are its static buffers); on the CPU, and for the
tests here, the padded call runs as it is, which is what makes the padding
itself checkable::

    sizes [1, 2, 4, 8]:  n=3 -> bucket 4 (1 padded row), n=8 -> 8, n=11 -> runs at 11 (above the largest)

``stats`` counts the calls per bucket and the fallbacks, for ``explain``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..core.rows import RowProof


def bucket_sizes(policy) -> list:
    """The sorted bucket sizes for ``policy``: a list of sizes, or ``"pow2:<max>"`` (1, 2, 4, ... up to max)."""
    if isinstance(policy, str):
        kind, _, top = policy.partition(":")
        if kind != "pow2" or not top.isdigit() or int(top) < 1:
            raise ValueError(f"bucket policy {policy!r}: give a list of sizes or 'pow2:<max>' (e.g. 'pow2:64')")
        sizes, size = [], 1
        while size <= int(top):
            sizes.append(size)
            size *= 2
        return sizes if sizes[-1] == int(top) else sizes + [int(top)]
    sizes = sorted(set(policy))
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"bucket sizes {list(policy)!r}: give positive ints")
    return sizes


def smallest_fitting(n: int, sizes: Sequence[int]) -> Optional[int]:
    """The smallest bucket that holds ``n`` rows, or None above the largest."""
    for size in sizes:
        if size >= n:
            return size
    return None


def _pad(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    extra = size - t.shape[axis]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[axis] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=axis)


class Bucketed:
    """Calls ``fn`` (flat graph inputs -> flat outputs) at bucketed batch sizes; see the module docstring."""

    def __init__(self, fn: Callable, proof: RowProof, sizes: Sequence[int]):
        if not proof.ok:
            raise ValueError(f"rows not proven independent along the batch ({proof.node}: {proof.reason}); "
                             "capture exact sizes only")
        self.fn, self.proof, self.sizes = fn, proof, bucket_sizes(sizes)
        self.stats = {"calls": {}, "above_largest": 0}

    def batch_of(self, args: Sequence[Any]) -> int:
        for a, axis in zip(args, self.proof.inputs):
            if axis is not None and isinstance(a, torch.Tensor):
                return a.shape[axis]
        raise ValueError("no input holds batch rows")

    def __call__(self, *args: Any) -> Any:
        n = self.batch_of(args)
        size = smallest_fitting(n, self.sizes)
        if size is None:
            self.stats["above_largest"] += 1
            return self.fn(*args)
        self.stats["calls"][size] = self.stats["calls"].get(size, 0) + 1
        padded = [_pad(a, axis, size) if axis is not None and isinstance(a, torch.Tensor) else a
                  for a, axis in zip(args, self.proof.inputs)]
        for i in self.proof.sizes:  # Dynamo hands the batch size in as an int
            padded[i] = size
        outs = self.fn(*padded)
        return self._slice(outs, n)

    def _slice(self, outs: Any, n: int) -> Any:
        single = not isinstance(outs, (list, tuple))
        seq = [outs] if single else list(outs)
        axes = iter(self.proof.outputs)
        result = []
        for o in seq:
            if isinstance(o, torch.Tensor):
                axis = next(axes, None)
                result.append(o if axis is None else o.narrow(axis, 0, n))
            else:
                result.append(o)
        if single:
            return result[0]
        return type(outs)(result) if isinstance(outs, tuple) else result
