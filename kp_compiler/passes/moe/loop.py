"""The unrolled expert loop form of ``moe-dispatch`` (``dispatch.py``): one ``STEP`` pattern per expert.

Matches the loop as Dynamo captures it with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True``: a chain of
``index_add`` into ``zeros_like(x)``, one step per expert ``e``::

    tok, slot = where(ids == e)                 # aten.where.default(aten.eq.Scalar(ids, e))
    xs = x[tok]
    h = act(linear(xs, w_gate_e)) * linear(xs, w_up_e)        # act: silu, gelu, gelu(tanh), relu
                                                              # or, ungated: h = act(linear(xs, w_up_e))
    y = linear(h, w_down_e) * weights.unsqueeze(-1)[tok, slot]
    out = out.index_add(0, tok, y)

Experts may be ``nn.ModuleList`` MLPs (weights are parameters) or slices of
3-D parameters (``w[e]``): the op takes whatever nodes hold the weights, so
gradients reach the model's own parameters.

Preconditions (else the graph is left as it is): the steps cover experts
``0..E-1`` exactly once; ``ids`` is the index output of ``topk`` over a last
dim of size ``E`` (so no id falls outside the loop); every step reads the
same ``x``, ``ids``, ``weights`` and activation; the expert weights have one
shape per role; ``weights`` has ``x``'s dtype; no intermediate value has a
user outside its step (the routing ``where`` may only feed the step and
Dynamo's size assertions, which go with it).

Before (one of E steps)::

    %eq = aten.eq.Scalar(%getitem_1, 0) : b8[10, 2]
    %where = aten.where.default(%eq) : (i64[u3], i64[u3])
    %index = aten.index.Tensor(%reshape, [%getitem_2]) : f32[u3, 16]
    ... linear, silu, linear, mul, linear, index of the weights, mul
    %index_add = aten.index_add.default(%zeros_like, 0, %getitem_2, %mul_1) : f32[10, 16]

After::

    %routed_experts = kp.routed_experts.default(%reshape, %getitem_1, %div, [%w_gate_0, ...], [%w_up_0, ...], [%w_down_0, ...], 'silu') : f32[10, 16]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from ...core.graph import val
from ...core.pattern import P
from .common import Experts, activation_of, ids_bounded

aten = torch.ops.aten
_SIZE_CHECKS = {aten.sym_size.int, operator.ge, operator.le, operator.lt, operator.gt, operator.eq,
                aten._assert_scalar.default, torch.sym_constrain_range_for_size,
                aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}


@dataclass
class Step:
    expert: int
    gate: Optional[fx.Node]  # None: an ungated expert, act(linear(x, up))
    up: fx.Node
    down: fx.Node
    activation: str
    nodes: list = field(default_factory=list)  # what the step alone uses, to erase
    biases: tuple = (None, None, None)  # (gate, up, down) bias nodes, None where a linear has none


def _one_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _linear(x: P, weight: str, **kw) -> P:
    """``linear(x, w)`` or ``linear(x, w, b)``, ``b`` a node or None."""
    return P(aten.linear.default, x, P.var(weight), where=_linear_args, **kw)


def _linear_args(node: fx.Node) -> bool:
    return len(node.args) in (2, 3) and (len(node.args) == 2 or node.args[2] is None
                                         or isinstance(node.args[2], fx.Node))


def _bias_of(node) -> Optional[fx.Node]:
    bias = node.args[2] if len(node.args) == 3 else None
    return bias if isinstance(bias, fx.Node) else None


def _act(inner: P, **kw) -> P:
    return P((aten.silu.default, aten.relu.default, aten.gelu.default), inner, **kw)


def _xs(users: int) -> P:
    """``x[tok]``: the tokens routed to this step's expert."""
    return P(aten.index.Tensor, P.var("x"), [P.var("tok")], name="xs", users=users)


_TOK = P(operator.getitem, P(aten.where.default, P(aten.eq.Scalar, P.var("ids"), P.var("e", where=lambda e: isinstance(e, int))),
                             where=lambda n: len(n.args) == 1, name="where"), 0, name="tok")
# weights.unsqueeze(-1)[tok, slot], slot = where(ids == e)[1]
_RW = P(aten.index.Tensor, P(aten.unsqueeze.default, P.var("weights"), P.var(where=lambda d: d in (2, -1)), name="unsq"),
        [P.var("tok"), P(operator.getitem, P.var("where"), 1, where=lambda n: len(n.args) == 2)], name="rw", users=1)
_GATED = P(aten.mul.Tensor, _act(_linear(_xs(2), "w_gate", name="gate_lin", users=1), name="act", users=1),
           _linear(_xs(2), "w_up", name="up_lin", users=1), commute=True, name="h", users=1)
_UNGATED = _act(_linear(_xs(1), "w_up", name="up_lin", users=1), name="act", users=1)
# out = out.index_add(0, tok, linear(h, w_down) * routing weight)
STEP = P(aten.index_add.default, P.var("acc"), 0, _TOK,
         P(aten.mul.Tensor, _linear(_UNGATED | _GATED, "w_down", name="down_lin", users=1), _RW, commute=True,
           name="y", users=1), where=lambda n: len(n.args) == 4 and not n.kwargs)


def _step(add: fx.Node) -> Optional[tuple[Step, fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(step, x, ids, weights, accumulator) for one ``index_add``, else None."""
    c = STEP.find(add)
    if c is None:
        return None
    gated = "h" in c
    nodes = [add, c["y"], c["rw"], c["down_lin"], c["act"], c["up_lin"], c["xs"], c["unsq"]]
    nodes += [c["h"], c["gate_lin"]] if gated else []
    biases = (_bias_of(c["gate_lin"]) if gated else None, _bias_of(c["up_lin"]), _bias_of(c["down_lin"]))
    step = Step(c["e"], c["w_gate"] if gated else None, c["w_up"], c["w_down"], activation_of(c["act"])[0],
                nodes, biases)
    return step, c["x"], c["ids"], c["weights"], c["acc"]


def _where_users_ok(where: fx.Node, step_nodes: set) -> Optional[list]:
    """Everything hanging off ``where`` is the step or Dynamo's size checks; return those checks."""
    checks, work, seen = [], list(where.users), set()
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in step_nodes:
            continue
        if n.target is operator.getitem or n.target in _SIZE_CHECKS:
            checks.append(n)
            work.extend(n.users)
            continue
        return None
    return checks


def match(last: fx.Node) -> Optional[Experts]:
    """The expert loop ending in the ``index_add`` ``last``, or None."""
    steps, cur = [], last
    x = ids = weights = None
    while isinstance(cur, fx.Node) and cur.target is aten.index_add.default:
        found = _step(cur)
        if found is None:
            return None
        step, sx, sids, sweights, acc = found
        if x is None:
            x, ids, weights = sx, sids, sweights
        if (sx, sids, sweights) != (x, ids, weights):
            return None
        steps.append(step)
        if cur is not last and not _one_user(cur):
            return None
        cur = acc
    start = cur
    if not (isinstance(start, fx.Node) and start.target is aten.zeros_like.default and start.args[0] is x
            and _one_user(start)):
        return None
    steps.reverse()
    E = len(steps)
    if sorted(s.expert for s in steps) != list(range(E)) or len({(s.activation, s.gate is None) for s in steps}) != 1:
        return None
    if not ids_bounded(ids, E) or val(weights) is None or val(weights).dtype != val(x).dtype:
        return None
    shapes = {(s.gate is None or tuple(val(s.gate).shape), tuple(val(s.up).shape), tuple(val(s.down).shape),
               tuple(None if b is None else tuple(val(b).shape) for b in s.biases)) for s in steps}
    if len(shapes) != 1:
        return None  # one weight shape per role, and every expert with or without each bias
    steps.sort(key=lambda s: s.expert)
    step_nodes = {n for s in steps for n in s.nodes}
    wheres = {s.nodes[0].args[2].args[0] for s in steps}  # tok = getitem(where, 0)
    checks = []
    for where in wheres:
        found = _where_users_ok(where, step_nodes)
        if found is None:
            return None
        checks += found
    first = steps[0]
    gated = "gated " if first.gate is not None else ""
    return Experts(
        "loop", x, ids, weights, [s.gate for s in steps if s.gate is not None], [s.up for s in steps],
        [s.down for s in steps], first.activation, last,
        [*step_nodes, *checks, *wheres, *(w.args[0] for w in wheres), start],
        biases=tuple([s.biases[i] for s in steps if s.biases[i] is not None] for i in range(3)),
        note=f"{len(steps)} experts, {gated}{first.activation}, from an unrolled loop")
