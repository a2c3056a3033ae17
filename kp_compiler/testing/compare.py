"""Helpers the tests, the zoo and the benchmarks share for running and comparing."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Optional, Sequence

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


def grads_of(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
    """``{name: a copy of its .grad, or None}`` for named tensors (``model.named_parameters()``)."""
    return {name: None if t.grad is None else t.grad.detach().clone() for name, t in named}


def missing_grads(got: Mapping[str, Optional[torch.Tensor]], ref: Mapping[str, Optional[torch.Tensor]]) -> list[str]:
    """Names whose gradient is ``None`` (or absent) on one side only: a lost gradient is a failure."""
    names = list(dict.fromkeys([*ref, *got]))
    return [n for n in names if (got.get(n) is None) != (ref.get(n) is None)]


def grad_error(got: Mapping[str, Optional[torch.Tensor]], ref: Mapping[str, Optional[torch.Tensor]]) -> float:
    """``rel_error`` over the gradients both sides have; ``inf`` when one side lacks one the other has."""
    if missing_grads(got, ref):
        return float("inf")
    names = [n for n in ref if ref[n] is not None]
    return rel_error([got[n] for n in names], [ref[n] for n in names])


def assert_same_grads(got: Mapping[str, Optional[torch.Tensor]], ref: Mapping[str, Optional[torch.Tensor]],
                      rtol: float, atol: float) -> None:
    """Every gradient equal within tolerance; one that is ``None`` on one side only fails, by name."""
    lost = missing_grads(got, ref)
    if lost:
        sides = {n: ("compiled" if got.get(n) is None else "reference") for n in lost}
        raise AssertionError(f"gradient missing on one side: {sides}")
    for name, r in ref.items():
        if r is not None:
            torch.testing.assert_close(got[name], r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}")
