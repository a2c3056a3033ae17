"""The dense expert form (every expert on every token, then masked) onto ``kp::routed_experts``.

Part of ``moe-dispatch``. Matches, with ``w_gate``, ``w_up`` of shape
``[E, f, d]`` and ``w_down`` of shape ``[E, d, f]``::

    weights, ids = topk(p, k)                                  # p [T, E]
    combine = zeros(T, E).scatter(1, ids, weights)             # or scatter_
    xe = x.unsqueeze(0).expand(E, T, d)
    h = act(bmm(xe, w_gate.transpose(1, 2))) * bmm(xe, w_up.transpose(1, 2))   # or act(bmm(xe, w_up^T))
    out = (bmm(h, w_down.transpose(1, 2)) * combine.t().unsqueeze(-1)).sum(0)

or the same with ``einsum`` (``match_einsum``; any letters, either operand order)::

    h = act(einsum("td,efd->etf", x, w_gate)) * einsum("td,efd->etf", x, w_up)   # or act(einsum(x, w_up))
    out = einsum("etd,te->td", einsum("etf,edf->etd", h, w_down), combine)

After::

    %routed_experts = kp.routed_experts.default(%x, %ids, %weights, [%w_gate], [%w_up], [%w_down], 'silu')

The dense form computes ``E / k`` times the FLOPs the routed op does. Both
give the same result wherever every expert's output is finite: the dense
form multiplies the outputs of the experts a token was not routed to by 0,
and the routed op never computes them (an inf there would be NaN in the
dense form). Preconditions: ``ids`` comes from ``topk`` over ``E``, so every
row holds ``k`` distinct experts; ``combine`` is ``scatter`` into zeros of
``[T, E]``; the routing weights already have ``x``'s dtype; every
intermediate is used only by the form.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core.graph import val
from ...core.pattern import is_call
from .common import Experts, activation_of, ids_bounded

aten = torch.ops.aten


def _weight_t(node) -> Optional[fx.Node]:
    """``w`` for ``w.transpose(1, 2)`` (or ``(-2, -1)``) of a 3-D ``w``."""
    if is_call(node, aten.transpose.int) and sorted(node.args[1:3]) in ([1, 2], [-2, -1]) and val(node.args[0]).dim() == 3:
        return node.args[0]
    return None


def _combine(node) -> Optional[tuple]:
    """(ids, weights, nodes) for ``zeros(T, E).scatter(1, ids, weights).t().unsqueeze(-1)``."""
    if not (is_call(node, aten.unsqueeze.default) and node.args[1] in (-1, 2)):
        return None
    t = node.args[0]
    if not (is_call(t, aten.t.default) or (is_call(t, aten.transpose.int) and sorted(t.args[1:3]) in ([0, 1], [-2, -1]))):
        return None
    scatter = t.args[0]
    if not (is_call(scatter, aten.scatter.src, aten.scatter_.src) and scatter.args[1] in (1, -1)):
        return None
    zeros, ids, weights = scatter.args[0], scatter.args[2], scatter.args[3]
    if not (is_call(zeros, aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)):
        return None
    return ids, weights, [node, t, scatter, zeros]


def match(end: fx.Node) -> Optional[Experts]:
    """The dense form ending in ``end``, else None."""

    if not (is_call(end, aten.sum.dim_IntList) and list(end.args[1]) == [0] and not end.kwargs
            and not (len(end.args) > 2 and end.args[2])):
        return None
    mul = end.args[0]
    if not is_call(mul, aten.mul.Tensor):
        return None
    for y, c in (mul.args, mul.args[::-1]):
        combine = _combine(c)
        if combine is not None and is_call(y, aten.bmm.default):
            break
    else:
        return None
    ids, weights, nodes = combine
    zeros = nodes[3]  # the [T, E] zeros the routing weights are scattered into
    h, down_t = y.args
    down = _weight_t(down_t)
    if down is None:
        return None
    nodes += [end, mul, y, down_t, h]
    act = activation_of(h)
    if act is not None:  # ungated
        activation, up_mm, gate_mm = act[0], act[1], None
    else:
        if not is_call(h, aten.mul.Tensor):
            return None
        for a, u in (h.args, h.args[::-1]):
            act = activation_of(a)
            if act is not None and is_call(act[1], aten.bmm.default) and is_call(u, aten.bmm.default):
                activation, gate_mm, up_mm = act[0], act[1], u
                nodes.append(a)
                break
        else:
            return None
    mms = [m for m in (gate_mm, up_mm) if m is not None]
    if not all(is_call(m, aten.bmm.default) for m in mms) or len({m.args[0] for m in mms}) != 1:
        return None
    expand = mms[0].args[0]
    if not (is_call(expand, aten.expand.default) and is_call(expand.args[0], aten.unsqueeze.default)
            and expand.args[0].args[1] == 0):
        return None
    x = expand.args[0].args[0]
    params = [_weight_t(m.args[1]) for m in mms]
    if any(p is None for p in params):
        return None
    nodes += [*mms, *(m.args[1] for m in mms), expand, expand.args[0]]
    gate, up = (params if gate_mm is not None else [None, params[0]])
    return _proven(x, ids, weights, zeros, gate, up, down, activation, end, nodes)


def _proven(x, ids, weights, zeros, gate, up, down, activation: str, end: fx.Node, nodes: list) -> Optional[Experts]:
    """The dense form's ``Experts`` when its preconditions hold (both spellings), else None."""
    dv = val(down)
    E = dv.shape[0] if isinstance(dv, torch.Tensor) and dv.dim() == 3 else None
    if E is None or not (is_call(ids, operator.getitem) and ids_bounded(ids, E)):
        return None
    xv, wv = val(x), val(weights)
    if xv is None or wv is None or xv.dim() != 2 or wv.dtype != xv.dtype:
        return None
    params = [p for p in (gate, up, down) if p is not None]
    if list(val(zeros).shape) != [xv.shape[0], E] or any(val(p).dim() != 3 or val(p).dtype != xv.dtype for p in params):
        return None
    return Experts("dense", x, ids, weights, [gate] if gate is not None else [], [up], [down], activation, end, nodes)


def _einsum_as(node, canonical: str) -> Optional[list]:
    """The two operands of ``aten.einsum`` ``node`` in ``canonical``'s order when its equation is ``canonical``
    up to a renaming of the letters (the operands may be listed in either order), else None."""
    if not (is_call(node, aten.einsum.default) and isinstance(node.args[0], str) and len(node.args[1]) == 2):
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    want_lhs, want_out = canonical.split("->")
    want = want_lhs.split(",")
    if len(terms) != 2:
        return None
    for order in ((0, 1), (1, 0)):
        got = [terms[order[0]], terms[order[1]], out]
        mapping: dict = {}
        if all(len(a) == len(b) for a, b in zip([*want, want_out], got)) and all(
                mapping.setdefault(a, b) == b for w, g in zip([*want, want_out], got) for a, b in zip(w, g)) \
                and len(set(mapping.values())) == len(mapping):
            return [node.args[1][order[0]], node.args[1][order[1]]]
    return None


def _scattered(node) -> Optional[tuple]:
    """(ids, weights, nodes) for ``zeros(T, E).scatter(1, ids, weights)``."""
    if not (is_call(node, aten.scatter.src, aten.scatter_.src) and node.args[1] in (1, -1)):
        return None
    zeros = node.args[0]
    if not is_call(zeros, aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return None
    return node.args[2], node.args[3], [node, zeros]


def match_einsum(end: fx.Node) -> Optional[Experts]:
    """The dense form written with ``einsum`` ending in ``end``, else None (the preconditions of ``match``)."""
    combined = _einsum_as(end, "etd,te->td")
    if combined is None:
        return None
    y, comb = combined
    scattered = _scattered(comb)
    down_in = _einsum_as(y, "etf,edf->etd")
    if scattered is None or down_in is None:
        return None
    ids, weights, nodes = scattered
    zeros = nodes[1]
    h, down = down_in
    nodes += [end, y, h]
    act = activation_of(h)
    projections = []
    if act is not None:  # ungated
        activation, projections = act[0], [None, act[1]]
    elif is_call(h, aten.mul.Tensor):
        for a, u in (h.args, h.args[::-1]):
            act = activation_of(a)
            if act is not None:
                activation, projections = act[0], [act[1], u]
                nodes.append(a)
                break
    if not projections:
        return None
    operands = [_einsum_as(m, "td,efd->etf") if m is not None else None for m in projections]
    if any(o is None for o, m in zip(operands, projections) if m is not None):
        return None
    present = [o for o in operands if o is not None]
    if len({o[0] for o in present}) != 1:
        return None
    x = present[0][0]
    nodes += [m for m in projections if m is not None]
    gate, up = (operands[0][1] if operands[0] else None), operands[1][1]
    return _proven(x, ids, weights, zeros, gate, up, down, activation, end, nodes)
