"""Helpers the tests, the zoo and the benchmarks share for running and comparing."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def dynamo_config(patches: dict) -> Iterator[None]:
    """Set ``torch._dynamo.config`` keys inside the block, restoring them after."""
    import torch._dynamo.config as cfg

    old = {k: getattr(cfg, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(cfg, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


def rel_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Relative L2 error of all tensors together (NaN if counts or shapes differ)."""
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
        return float("nan")
    num = sum(((g.double() - r.double()) ** 2).sum().item() for g, r in zip(got, ref))
    den = sum((r.double() ** 2).sum().item() for r in ref)
    return (num / max(den, 1e-30)) ** 0.5
