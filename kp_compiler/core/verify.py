"""``verify`` mode: run a graph before and after a pass on random inputs.

Floating-point inputs are drawn fresh from a normal distribution (never
zeros); integer and boolean inputs (token ids, indices, masks) keep the
example values, since random ones would often be out of range. SymInt
inputs take the example's concrete size. Both graphs run with the same RNG
seed, so dropout draws the same mask when the pass left it alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx

# (rtol, atol) for a rewrite that may reorder accumulation.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


class VerifyError(AssertionError):
    """A pass changed what the graph computes."""


def concrete(x: Any) -> Any:
    """A concrete Python number for a SymInt/SymFloat example input."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = x.node.hint
        if hint is None:
            raise VerifyError(f"cannot verify: symbolic input {x} has no concrete hint")
        return hint
    return x


def random_inputs(examples: Sequence[Any], seed: int = 0, keep: frozenset = frozenset()) -> list[Any]:
    """Fresh normal floats for every float input except those in ``keep`` (kept as given)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, x in enumerate(examples):
        x = concrete(x)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and i not in keep:
            r = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
            out.append(r.to(x.device))
        elif isinstance(x, torch.Tensor):
            out.append(x.detach().clone())
        else:
            out.append(x)
    return out


def _compare(name: str, a: Any, b: Any) -> None:
    if not isinstance(a, torch.Tensor):
        if a != b:
            raise VerifyError(f"output {name}: {a!r} != {b!r}")
        return
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        raise VerifyError(f"output {name}: {_desc(a)} became {_desc(b)}")
    if not a.is_floating_point():
        if not torch.equal(a, b):
            raise VerifyError(f"output {name}: integer values differ")
        return
    rtol, atol = TOLERANCES.get(a.dtype, (1e-4, 1e-5))
    if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        err = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
        raise VerifyError(f"output {name}: max abs error {err:.3g} exceeds rtol={rtol}, atol={atol}")


def _desc(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype}{list(t.shape)}"
    return type(t).__name__


def check_same_outputs(before: fx.GraphModule, after: fx.GraphModule, examples: Sequence[Any],
                       keep=frozenset()) -> None:
    """Raise ``VerifyError`` unless both graphs agree on fresh random inputs (``keep``: indices left as given)."""
    inputs = random_inputs(examples, keep=frozenset(keep))
    with torch.no_grad():
        torch.manual_seed(1234)
        ref = before(*[_fresh(x) for x in inputs])
        torch.manual_seed(1234)
        got = after(*[_fresh(x) for x in inputs])
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if ref_spec != got_spec:
        raise VerifyError(f"output structure changed: {ref_spec} -> {got_spec}")
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        _compare(str(i), a, b)


def _fresh(x: Any) -> Any:
    # Graphs may mutate inputs in place; each run gets its own copy.
    return x.clone() if isinstance(x, torch.Tensor) else x
