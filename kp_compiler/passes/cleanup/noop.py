"""``noop-elimination``: drop ops that return their input unchanged.

Written with the rule API as the example to copy (see docs/writing-passes.md).

Matches (exact overloads, so ``div`` with a rounding mode is never touched):
``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, ``x.to(x.dtype)``, a ``view`` or
``reshape`` or ``expand`` to ``x``'s own shape, a ``permute`` by the identity,
``transpose(d, d)``, ``x.t().t()``, ``dropout`` with ``p=0`` or ``train=False``.

Emits nothing: uses of the op read ``x`` directly.

Preconditions, proven per match (``graph.can_forward``): the result has
provably the same shape, dtype and device as ``x`` (so ``int_tensor * 1.0``,
which promotes, stays); neither value is mutated through any alias; and a
graph output never becomes an alias of a graph input.

Before::

    %mul = aten.mul.Tensor(%linear, 1) : f32[4, 32]
    %view = aten.view.default(%mul, [4, 32]) : f32[4, 32]
    %relu = aten.relu.default(%view) : f32[4, 32]

After::

    %relu = aten.relu.default(%linear) : f32[4, 32]
"""

from __future__ import annotations

import torch

from ...core.graph import AliasFacts, can_forward, val
from ...core.rules import P, Rule, RuleSet

aten = torch.ops.aten

x = P.var("x")


def _forward_x(m, x, **_):
    """Replace the op by its input ``x`` when that is provably safe."""
    if "aliases" not in m.state:
        m.state["aliases"] = AliasFacts(m.graph)
    return x if can_forward(m.root, x, m.state["aliases"]) else None


def _identity_permute(m, x, dims):
    rank = val(x).dim() if val(x) is not None else -1
    if list(dims) != list(range(rank)):
        return None
    return _forward_x(m, x)


def _same_dim_transpose(m, x, d0, d1):
    rank = val(x).dim() if val(x) is not None else 0
    if rank == 0 or d0 % rank != d1 % rank:
        return None
    return _forward_x(m, x)


def _inactive_dropout(m, x, p, train):
    return _forward_x(m, x) if (p == 0 or not train) else None


def _same_dtype_to(m, x, **_):
    if m.root.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return _forward_x(m, x)


RULES = [
    Rule(P(aten.mul.Tensor, x, P.lit(1)), _forward_x, name="mul-by-one"),
    Rule(P(aten.div.Tensor, x, P.lit(1)), _forward_x, name="div-by-one"),
    Rule(P(aten.add.Tensor, x, P.lit(0)), _forward_x, name="add-zero"),
    Rule(P(aten.sub.Tensor, x, P.lit(0)), _forward_x, name="sub-zero"),
    Rule(P((aten.view.default, aten.reshape.default, aten.expand.default), x), _forward_x, name="same-shape-view"),
    Rule(P(aten.permute.default, x, P.var("dims")), _identity_permute, name="identity-permute"),
    Rule(P(aten.transpose.int, x, P.var("d0"), P.var("d1")), _same_dim_transpose, name="same-dim-transpose"),
    Rule(P(aten.t.default, P(aten.t.default, x)), _forward_x, name="double-t"),
    Rule(P((aten.to.dtype, aten.to.dtype_layout, aten.to.device), x), _same_dtype_to, name="same-dtype-to"),
    Rule(P(aten.dropout.default, x, P.var("p"), P.var("train")), _inactive_dropout, name="inactive-dropout"),
]

noop_elimination = RuleSet("noop-elimination", RULES)
