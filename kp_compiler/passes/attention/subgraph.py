"""Run the constant subgraph behind a node for real, at compile time.

A mask or bias built only from ops that create their own data (``arange``,
``ones``, comparisons, gathers of those) reads no graph input: its value is
the same on every call with these shapes, so evaluating it once is a proof
about every call (static lengths only; the lifts that use it say so).

Before (the subgraph behind ``%le``)::

    %arange = aten.arange.default(4)
    %unsqueeze = aten.unsqueeze.default(%arange, 1)
    %le = aten.le.Tensor(%arange, %unsqueeze)

After::

    evaluate(le) -> tensor([[True, False, False, False], ..., [True, True, True, True]])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

MAX_ELEMENTS = 1 << 28  # a subgraph node bigger than this is not run (compile-time memory)


_UNSET_VALUES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


def _same_every_call(n: fx.Node) -> bool:
    """A call whose value depends on its inputs alone: not random, not impure, not uninitialised memory."""
    target = n.target
    if n.is_impure() or getattr(target, "__name__", "").split(".")[0] in _UNSET_VALUES:
        return False
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def reads_no_input(root: fx.Node) -> Optional[list[fx.Node]]:
    """The call nodes behind ``root`` in graph order, or None if it reads a placeholder or an attribute,
    or one of them may differ between calls (random, impure, uninitialised)."""
    nodes, seen, work = [], set(), [root]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call_function" or not _same_every_call(n):
            return None
        nodes.append(n)
        work.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _small_enough(nodes: list[fx.Node]) -> bool:
    for n in nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and not (isinstance(v.numel(), int) and v.numel() <= MAX_ELEMENTS):
            return False
    return True


def evaluate(root: fx.Node) -> Optional[torch.Tensor]:
    """``root``'s value, or None if it reads anything but constants it builds (or is too big to run)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    nodes = reads_no_input(root)
    if nodes is None or not _small_enough(nodes):
        return None
    graph, env = fx.Graph(), {}
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[root])
    with unset_fake_temporarily(), torch.no_grad():
        out = fx.GraphModule(torch.nn.Module(), graph)()
    return out if isinstance(out, torch.Tensor) else None
