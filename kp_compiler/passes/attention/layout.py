"""Layouts around attention: GQA head repeats, k from k^T, batch regrouping."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...core.graph import val
from ...core.pattern import number

aten = torch.ops.aten



def gqa_source(node, symbolic_groups: bool = False):
    """(kv, groups) when ``node`` repeats 4-D ``kv``'s heads ``groups`` times (each head in a row).

    Spellings: ``repeat_interleave(kv, groups, dim=1)`` and Hugging Face's
    ``repeat_kv``: ``kv[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)``.
    ``groups`` is a number, or with ``symbolic_groups`` also a symbolic-int node (``dynamic=True``: the
    caller then must not need its value, as flex, which reads the grouping off the shapes).
    """
    if not isinstance(node, fx.Node) or val(node) is None or val(node).dim() != 4:
        return None
    if node.target is aten.repeat_interleave.self_int and len(node.args) >= 3:
        groups, dim = node.args[1], node.args[2]
        return (node.args[0], groups) if dim in (1, -3) and number(groups) else None
    if node.target not in (aten.reshape.default, aten.view.default):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default:
        return None
    unsq = expand.args[0]
    if not isinstance(unsq, fx.Node) or unsq.target is not aten.unsqueeze.default or unsq.args[1] not in (2, -3):
        return None
    kv = unsq.args[0]
    b, h, s_, d = val(kv).shape
    groups = list(expand.args[1])[2]
    g = groups if number(groups) else val(groups) if symbolic_groups and isinstance(groups, fx.Node) else None
    if not isinstance(g, (int, torch.SymInt)):
        return None
    shape_ok = (statically_known_true(val(expand).shape[2] == g)
                and all(statically_known_true(a == c) for a, c in zip(val(node).shape, (b, h * g, s_, d))))
    return (kv, groups) if shape_ok else None

def untranspose(g: fx.Graph, k_t: fx.Node) -> fx.Node:
    """k from k^T: peel a transpose (or permute) of the last two dims, else transpose back."""
    rank = val(k_t).dim()
    if k_t.target is aten.transpose.int and {k_t.args[1] % rank, k_t.args[2] % rank} == {rank - 2, rank - 1}:
        return k_t.args[0]
    swap_last = list(range(rank - 2)) + [rank - 1, rank - 2]
    if k_t.target is aten.permute.default and [d % rank for d in k_t.args[1]] == swap_last:
        return k_t.args[0]
    return g.call_function(aten.transpose.int, (k_t, -2, -1))

def regroup(g: fx.Graph, node: fx.Node, space: tuple) -> fx.Node:
    """``node`` ([..., n, e]) viewed with the leading dims of ``space``."""
    n, e = val(node).shape[-2:]
    return g.call_function(aten.reshape.default, (node, [*space[:-2], n, e]))
