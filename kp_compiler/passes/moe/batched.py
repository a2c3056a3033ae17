"""Hugging Face transformers v5's batched expert forms onto one ``kp::routed_experts`` op.

Part of ``moe-dispatch`` (``dispatch.py``; ``loop.py`` matches the ``for e in range(E)`` loop).
Both forms keep the experts as 3-D parameters, ``gate_up [E, 2f, d]`` (gate
rows first) or ``up [E, f, d]``, and ``down [E, d, f]``, and end in
``y.view(T, k, d).sum(1)``.

``experts_implementation="grouped_mm"`` (``proj`` is ``aten._grouped_mm`` or,
where that cannot run, ``transformers.grouped_mm_fallback``)::

    sorted_ids, perm = sort(ids.reshape(-1))
    offs = cumsum(histc(sorted_ids.float(), E, 0, E - 1), 0, dtype=int32)
    gu = proj(x[perm // k], gate_up.transpose(-2, -1), offs)
    h = act(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]            # ungated: act(proj(..., up.T, offs))
    y = proj(h, down.transpose(-2, -1), offs) * weights.reshape(-1)[perm].unsqueeze(-1)
    out = y[empty_like(perm).index_put_([perm], arange(T*k))].view(T, k, d).sum(1)

``experts_implementation="batched_mm"``::

    gu = bmm(gate_up[ids.reshape(-1)], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
    h = act(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
    y = bmm(down[ids.reshape(-1)], h.unsqueeze(-1)).squeeze(-1) * weights.reshape(-1).unsqueeze(-1)
    out = y.view(T, k, d).sum(1)

transformers 5.17 also guards both forms for expert parallelism: the grouped
form masks rows whose sorted id is a sentinel (``masked_fill(t, ge(sorted_ids,
E).unsqueeze(-1), 0.0)`` around each projection, and ``sorted_ids.clamp_(max=E
- 1)``), the batched form clamps the ids to ``[0, E - 1]``. With ids from
``topk`` over E every guard is a no-op, so the match sees through them; a
guard with another bound is not a no-op and the form is left as it is.

After (both)::

    %routed_experts = kp.routed_experts.default(%x, %ids, %weights, [%gate], [%up], [%down], 'silu')

with ``[%gate] = [slice(gate_up, 1, 0, f)]``, ``[%up] = [slice(gate_up, 1, f, 2f)]``
and ``[%down]``: each role as one 3-D view of the model's parameter (the op's
stacked form), so gradients reach the parameters as one tensor each. Preconditions (else left as
it is): ``ids`` is ``topk`` over ``E``; no bias, no post-expert norm, the
weights not transposed (``is_transposed=False``); every intermediate used
only by the form; the projections' inputs already in the weights' dtype.
Routing weights of another dtype are cast to ``x``'s, and the result back to
the form's dtype.
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


def _grouped_mm_targets() -> tuple:
    found = [aten._grouped_mm.default]
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        found.append(fallback.default)
    return tuple(found)


def _same_dtype_cast(node):
    """``node`` through a ``.to(dtype)`` that changes nothing (else the node itself)."""
    if is_call(node, aten.to.dtype, aten._to_copy.default) and val(node) is not None and val(node.args[0]) is not None \
            and val(node).dtype == val(node.args[0]).dtype:
        return node.args[0], [node]
    return node, []


def _transposed_param(node) -> Optional[fx.Node]:
    if is_call(node, aten.transpose.int) and sorted(node.args[1:3]) in ([-2, -1], [1, 2]):
        return node.args[0]
    return None


class _Form:
    """Matches one batched form, collecting its nodes; ``fail`` on the first mismatch."""

    def __init__(self):
        self.nodes: list = []
        self.offsets_of = None  # the flat ids behind the grouped form's shared offsets
        self.sentinels: list = []  # ``ge(sorted_ids, E)`` masks (transformers 5.17), checked once E is known

    def unmask(self, node):
        """``node`` through transformers 5.17's expert-parallel sentinel mask, ``masked_fill(t, ge(sorted_ids,
        E).unsqueeze(-1), 0.0)`` (or ``masked_fill_``): all False when every id is below E (checked in ``_match``)."""
        if not (is_call(node, aten.masked_fill.Scalar, aten.masked_fill_.Scalar) and node.args[2] == 0.0):
            return node
        mask = node.args[1]
        if not (is_call(mask, aten.unsqueeze.default) and is_call(mask.args[0], aten.ge.Scalar)):
            return node
        self.nodes += [node, mask, mask.args[0]]
        self.sentinels.append(mask.args[0])
        return node.args[0]

    def unclamp(self, ids):
        """``ids`` through ``clamp(ids, 0, E - 1)`` (transformers 5.17's batched form), recorded for the bound check."""
        if is_call(ids, aten.clamp.default):
            self.nodes.append(ids)
            self.sentinels.append(ids)
            return ids.args[0]
        return ids

    def take(self, node, *targets):
        if not is_call(node, *targets):
            raise LookupError(node)
        self.nodes.append(node)
        return node


def _gated(form: _Form, h) -> tuple[str, fx.Node]:
    """(activation, projection) for ``act(chunk(p)[0]) * chunk(p)[1]``, or ``act(p)`` (ungated: projection)."""

    act = activation_of(h)
    if act is not None:
        form.nodes.append(h)
        return act[0], ("ungated", act[1])
    form.take(h, aten.mul.Tensor)
    for a, u in (h.args, h.args[::-1]):
        act = activation_of(a)
        if act is None or not (is_call(act[1], operator.getitem) and is_call(u, operator.getitem)):
            continue
        chunk = act[1].args[0]
        if not (is_call(chunk, aten.chunk.default) and u.args[0] is chunk and act[1].args[1] == 0 and u.args[1] == 1
                and chunk.args[1] == 2 and chunk.args[2] in (-1, 1)):
            continue
        form.nodes += [a, act[1], u, chunk]
        return act[0], ("gated", chunk.args[0])
    raise LookupError(h)


def match(end: fx.Node, misses: Optional[list] = None) -> Optional[Experts]:
    """The form ending in ``end`` (``sum(view(y, [T, k, d]), [1])``), else None. ``misses``: where the whole
    form matched but its ids are not proven below E, the reason is appended."""
    try:
        return _match(end, misses)
    except (LookupError, IndexError, TypeError, AttributeError):
        return None


def _match(end: fx.Node, misses: Optional[list] = None) -> Optional[Experts]:

    form = _Form()
    form.take(end, aten.sum.dim_IntList)
    if list(end.args[1]) != [1] or (len(end.args) > 2 and end.args[2]) or end.kwargs:
        return None
    view = form.take(end.args[0], aten.view.default, aten.reshape.default)
    y = view.args[0]
    grouped = is_call(y, aten.index.Tensor)
    perm = None
    if grouped:  # y[inv]: undo the sort
        form.take(y, aten.index.Tensor)
        inv = form.take(y.args[1][0], aten.index_put_.default, aten.index_put.default)
        form.take(inv.args[0], aten.empty_like.default)
        perm = inv.args[1][0]
        form.take(inv.args[2], aten.arange.default)
        y = y.args[0]
    mul = form.take(y, aten.mul.Tensor)
    proj_down, route = mul.args
    if is_call(proj_down, aten.unsqueeze.default):
        proj_down, route = route, proj_down
    form.take(route, aten.unsqueeze.default)
    flat_w = route.args[0]
    if grouped:
        flat_w = form.take(flat_w, aten.index.Tensor)
        if flat_w.args[1][0] is not perm:
            return None
        flat_w = flat_w.args[0]
    form.take(flat_w, aten.reshape.default, aten.view.default)
    weights = flat_w.args[0]
    down, h, flat_ids = _projection(form, proj_down, grouped, perm)
    activation, (kind, proj_up) = _gated(form, h)
    first, xs_ids, xs = _projection_input(form, proj_up, grouped, perm)
    if xs_ids is not flat_ids or first is None:
        return None
    ids = flat_ids.args[0]
    x = xs
    gate_up = first if kind == "gated" else None
    up = first if kind == "ungated" else None
    E = val(down).shape[0]
    k = val(ids).shape[-1] if val(ids) is not None and val(ids).dim() == 2 else None
    if k is None or list(view.args[1])[1:] != [k, val(x).shape[-1]]:
        return None
    if not ids_bounded(ids, E):
        if misses is not None:
            source = "an input of this graph" if ids.op == "placeholder" else f"{ids.name}, not topk over {E}"
            misses.append(f"transformers {'grouped_mm' if grouped else 'batched_mm'} experts ending at {end.name} "
                          f"left alone: their ids come from {source}, so nothing proves them below {E} (expert "
                          "parallelism hands the experts ids made in another graph)")
        return None
    if val(first).dtype != val(x).dtype or val(down).dtype != val(x).dtype:
        return None
    if not all(_no_op_on_ids(guard, E, form) for guard in form.sentinels):
        return None
    return Experts("batched", x, ids, weights, [], [up] if up is not None else [], [down], activation, end,
                   form.nodes, gate_up=gate_up, grouped=grouped)


def _projection(form: _Form, node, grouped: bool, perm):
    """(weight param, input, flat ids) of one expert projection."""
    if grouped:
        gmm = form.take(form.unmask(node), *_grouped_mm_targets())
        inp, w_t, offs = gmm.args[:3]
        param = _transposed_param(w_t)
        if param is None:
            raise LookupError(w_t)
        form.nodes.append(w_t)
        inp, casts = _same_dtype_cast(inp)
        form.nodes += casts
        flat_ids = _offsets(form, offs, perm)
        return param, form.unmask(inp), flat_ids
    squeeze = form.take(node, aten.squeeze.dim)
    bmm = form.take(squeeze.args[0], aten.bmm.default)
    picked, col = bmm.args
    form.take(picked, aten.index.Tensor)
    form.take(col, aten.unsqueeze.default)
    flat_ids = form.unclamp(picked.args[1][0])
    form.take(flat_ids, aten.reshape.default, aten.view.default)
    return picked.args[0], col.args[0], flat_ids


def _offsets(form: _Form, offs, perm):
    """``flat_ids`` for ``offs = cumsum(histc(sort(flat_ids)[0].float(), E, 0, E-1), 0)``."""
    if offs in form.nodes:
        return form.offsets_of
    cumsum = form.take(offs, aten.cumsum.default)
    histc = form.take(cumsum.args[0], aten.histc.default)
    sorted_ids = histc.args[0]
    if is_call(sorted_ids, aten.to.dtype, aten._to_copy.default):
        form.nodes.append(sorted_ids)
        sorted_ids = sorted_ids.args[0]
    form.take(sorted_ids, operator.getitem)
    for user in sorted_ids.users:  # transformers 5.17: ``sorted_ids.clamp_(max=E - 1)``, read by nothing after
        if is_call(user, aten.clamp_.default) and not user.users:
            form.nodes.append(user)
            form.sentinels.append(user)
    sort = form.take(sorted_ids.args[0], aten.sort.default)
    if not (is_call(perm, operator.getitem) and perm.args == (sort, 1)):
        raise LookupError(perm)
    form.nodes.append(perm)
    flat_ids = form.take(sort.args[0], aten.reshape.default, aten.view.default)
    form.offsets_of = flat_ids
    return flat_ids


def _no_op_on_ids(guard: fx.Node, experts: int, form: _Form) -> bool:
    """A sentinel guard of transformers 5.17 that changes nothing when every id is in ``[0, E)``:
    ``ge(sorted_ids, E)`` (all False), or ``clamp(ids, lo, hi)`` / ``clamp_`` with ``lo <= 0`` and
    ``hi >= E - 1`` on the form's own ids."""
    if is_call(guard, aten.ge.Scalar):
        return guard.args[1] >= experts and is_call(guard.args[0], operator.getitem) and guard.args[0] in form.nodes
    lo = guard.args[1] if len(guard.args) > 1 else guard.kwargs.get("min")
    hi = guard.args[2] if len(guard.args) > 2 else guard.kwargs.get("max")
    return (lo is None or lo <= 0) and (hi is None or hi >= experts - 1) and guard.args[0] in form.nodes


def _projection_input(form: _Form, proj, grouped: bool, perm):
    """(weight param, flat ids, x) of the first projection, whose input is the routed tokens."""
    param, inp, flat_ids = _projection(form, proj, grouped, perm)
    if grouped:
        form.take(inp, aten.index.Tensor)
        div = form.take(inp.args[1][0], aten.floor_divide.default, aten.div.Tensor_mode)
        if div.args[0] is not perm:
            return None, None, None
        return param, flat_ids, inp.args[0]
    rep = form.take(inp, aten.repeat_interleave.self_int)
    return param, flat_ids, rep.args[0]
