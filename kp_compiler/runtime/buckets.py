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

from ..core.bucket_policy import bucket_sizes
from ..core.rows import RowProof

__all__ = ["Bucketed", "bucket_sizes", "smallest_fitting"]


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
    """Calls ``fn`` (flat graph inputs -> flat outputs) at bucketed batch sizes; see the module docstring.

    A batched input or output may hold ``c`` rows per batch element (tokens flattened to rows: ``[B*S, d]``):
    it is padded to ``c * bucket`` rows and narrowed to ``c * n``.
    """

    def __init__(self, fn: Callable, proof: RowProof, sizes: Sequence[int]):
        if not proof.ok:
            raise ValueError(f"rows not proven independent along the batch ({proof.node}: {proof.reason}); "
                             "capture exact sizes only")
        if not proof.sizes and not proof.unit:
            raise ValueError("no graph input is the batch size or has it as a dim: the batch cannot be read")
        self.fn, self.proof = fn, proof
        # buckets past the batch the graph was compiled for (a torch._check, a guard) are not used
        self.sizes = [s for s in bucket_sizes(sizes) if proof.max_batch is None or s <= proof.max_batch]
        self.stats = {"calls": {}, "above_largest": 0}

    def batch_of(self, args: Sequence[Any]) -> int:
        if self.proof.sizes:  # Dynamo hands the batch size in
            return int(args[self.proof.sizes[0]])
        i = self.proof.unit[0]
        return args[i].shape[self.proof.inputs[i]]

    def bucket(self, args: Sequence[Any]) -> tuple:
        """``(n, bucket)`` for a call; the bucket is None (counted) where the call runs unpadded."""
        n = self.batch_of(args)
        size = smallest_fitting(n, self.sizes) if n > 0 else None
        if size is None:
            self.stats["above_largest"] += 1
        else:
            self.stats["calls"][size] = self.stats["calls"].get(size, 0) + 1
        return n, size

    def __call__(self, *args: Any) -> Any:
        n, size = self.bucket(args)
        if size is None:
            return self.fn(*args)
        padded = list(args)
        for i, (a, axis) in enumerate(zip(args, self.proof.inputs)):
            if axis is not None and isinstance(a, torch.Tensor):
                per_row, rest = divmod(a.shape[axis], n)
                if rest:
                    raise ValueError(f"input {i} has {a.shape[axis]} rows along its batch dim, not a multiple of {n}")
                padded[i] = _pad(a, axis, per_row * size)
        for i in self.proof.sizes:
            padded[i] = size
        return self._narrow(self.fn(*padded), n, size)

    def _narrow(self, outs: Any, n: int, size: int) -> Any:
        single = not isinstance(outs, (list, tuple))
        seq = [outs] if single else list(outs)
        result = []
        for o, axis in zip(seq, self.proof.outputs):  # one axis per graph output, tensors or not
            if axis is not None and isinstance(o, torch.Tensor):
                o = o.narrow(axis, 0, o.shape[axis] // size * n)
            result.append(o)
        if single:
            return result[0]
        return type(outs)(result) if isinstance(outs, tuple) else result
