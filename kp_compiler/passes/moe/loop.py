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

transformers 4's spelling (Mixtral, Qwen2-MoE and others before v5) matches too::

    slot, tok = where(one_hot(ids, E).permute(2, 1, 0)[e])    # the same (token, slot) pairs, another order
                                                              # (.permute(2, 0, 1): tok, slot)
    xs = x[None, tok].reshape(-1, d)
    final.index_add_(0, tok, expert_e(xs) * weights[tok, slot, None])    # in place, into zeros((T, d));
                                                              # weights[tok, slot].unsqueeze(-1) as well

The mask form matches too, with ``sel = (ids == e).any(-1)``, ``xs = x[sel]``, the weight
``(weights * (ids == e)).sum(-1)[sel]`` and ``out[sel] += y`` (or ``out.index_put((sel,), y,
accumulate=True)``): top-k ids are distinct per row, so ``sel`` holds the tokens of
``where(ids == e)`` once each and the masked sum is the weight of the one matching slot.

The routing may also be spelled ``tok, slot = (ids == e).nonzero(as_tuple=True)``
(``aten.nonzero_numpy``) or ``nz = nonzero(ids == e); tok, slot = nz[:, 0], nz[:, 1]``, and the
sum ``out.scatter_add(0, tok[:, None].expand(-1, d), y)`` (the index must span the whole row:
a narrower one drops columns, and the report says so) or ``out.index_put((tok,), y,
accumulate=True)``, each also in place.

A linear may be ``F.linear(x, w[, b])`` or ``x @ w.T [+ b]`` (``b`` 1-D, of the
output's width). Experts may be ``nn.ModuleList`` MLPs (weights are parameters) or slices of
3-D parameters (``w[e]``): the op takes whatever nodes hold the weights, so
gradients reach the model's own parameters.

Preconditions (else the graph is left as it is): the steps cover experts
``0..E-1`` exactly once; ``ids`` is the index output of ``topk`` over a last
dim of size ``E`` (so no id falls outside the loop), and a ``one_hot`` has
``E`` classes; the sum starts from ``zeros_like(x)`` or ``zeros`` of ``x``'s
shape, dtype and device, used by nothing else; every step reads the
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
    classes: Optional[int] = None  # one_hot(ids, classes) dispatch: must be the number of experts
    cast: Optional[torch.dtype] = None  # the step's output cast before the sum (to another dtype than x's: refused)
    where: Optional[fx.Node] = None  # the routing: where / nonzero_numpy (tok, slot), nonzero ([n, 2]) or a row mask
    sized: list = field(default_factory=list)  # nodes whose data-dependent size Dynamo checks (the mask form)
    acc_reads: list = field(default_factory=list)  # besides the combine, what reads the partial sum (out[sel] += y)


def _transposed(weight: str) -> P:
    """``w.T``, ``w.t()``, ``w.transpose(0, 1)`` (either order, negative dims too) or ``w.permute(1, 0)``."""
    return (P((aten.numpy_T.default, aten.t.default), P.var(weight))
            | P(aten.transpose.int, P.var(weight), P.var(), P.var(), where=_swaps_2d)
            | P(aten.permute.default, P.var(weight), P.var(where=lambda d: list(d) == [1, 0])))


def _swaps_2d(node: fx.Node) -> bool:
    return len(node.args) == 3 and {node.args[1] % 2, node.args[2] % 2} == {0, 1}


def _linear(x: P, weight: str, **kw) -> P:
    """``linear(x, w)``, ``linear(x, w, b)`` (``b`` a node or None), ``x @ w.T`` or ``x @ w.T + b``."""
    name = kw["name"]
    matmul = P(aten.matmul.default, x, _transposed(weight), users=1, name=f"{name}_mm")
    return (P(aten.linear.default, x, P.var(weight), where=_linear_args, **kw)
            | P(aten.add.Tensor, matmul, P.var(f"{name}_bias"), commute=True, where=lambda n: len(n.args) == 2
                and not n.kwargs, **kw)
            | P(aten.matmul.default, x, _transposed(weight), **kw))


def _linear_args(node: fx.Node) -> bool:
    return len(node.args) in (2, 3) and (len(node.args) == 2 or node.args[2] is None
                                         or isinstance(node.args[2], fx.Node))


def _bias_of(node, c: dict, name: str):
    """The bias node of the linear ``node`` (None without one); False for an added term that is not a
    bias of the output's width (``x @ w.T + t`` with ``t`` anything else is not a linear)."""
    if node.target is aten.add.Tensor:
        bias = c.get(f"{name}_bias")
        bv, out = val(bias), val(node)
        if not (isinstance(bias, fx.Node) and isinstance(bv, torch.Tensor) and bv.dim() == 1
                and bv.shape[0] == out.shape[-1] and bv.dtype == out.dtype):
            return False
        return bias
    bias = node.args[2] if node.target is aten.linear.default and len(node.args) == 3 else None
    return bias if isinstance(bias, fx.Node) else None


def _act(inner: P, **kw) -> P:
    return P((aten.silu.default, aten.relu.default, aten.gelu.default), inner, **kw)


def _users_besides_size_checks(users: int):
    """A ``where`` test: the node has ``users`` users other than Dynamo's size checks (``x[mask]`` has those)."""
    return lambda n: sum(1 for u in n.users if u.target not in _SIZE_CHECKS) == users


def _xs(users: int) -> P:
    """``x[tok]`` (``tok`` an index or a row mask), or ``x[None, tok].reshape(-1, d)`` (transformers 4's
    Mixtral): the tokens routed to this step's expert."""
    return (P(aten.index.Tensor, P.var("x"), [P.var("tok")], name="xs", where=_users_besides_size_checks(users))
            | P(aten.reshape.default, P(aten.index.Tensor, P(aten.unsqueeze.default, P.var("x"), 0, users=1,
                                                              name="xs_unsq"),
                                        [None, P.var("tok")], users=1, name="xs_index"),
                P.var(where=lambda s: isinstance(s, (list, tuple)) and len(s) == 2 and s[0] == -1),
                name="xs", users=users))


_E = P.var("e", where=lambda e: isinstance(e, int))
_EQ = P(aten.eq.Scalar, P.var("ids"), _E)
# tok, slot = where(ids == e), or (ids == e).nonzero(as_tuple=True)
_WHERE_EQ = (P(aten.where.default, _EQ, where=lambda n: len(n.args) == 1, name="where")
             | P(aten.nonzero_numpy.default, _EQ, name="where"))
# nz = nonzero(ids == e); tok, slot = nz[:, 0], nz[:, 1]
_NONZERO_EQ = P(aten.nonzero.default, _EQ, name="where")


def _where_one_hot(perm: list) -> P:
    """``where(one_hot(ids, E).permute(*perm)[e])``: (slot, tok) for ``[2, 1, 0]`` (transformers 4's Mixtral,
    Qwen2-MoE, ...), (tok, slot) for ``[2, 0, 1]`` (its DeepSeek-V3)."""
    return P(aten.where.default,
             P(aten.select.int, P(aten.permute.default, P(aten.one_hot.default, P.var("ids"), P.var("classes")),
                                  P.var(where=lambda d: list(d) == perm)), 0, _E),
             where=lambda n: len(n.args) == 1, name="where")


_LAST = P.var(where=lambda d: d in (1, -1))
# sel = (ids == e).any(-1): a boolean row mask (the mask form; with distinct top-k ids, the tokens of where(ids == e))
_SEL = P(aten.any.dim, P(aten.eq.Scalar, P.var("ids"), _E, name="eq"), _LAST, name="tok")
_TOK = (P(operator.getitem, _WHERE_EQ, 0, name="tok")
        | P(aten.select.int, _NONZERO_EQ, 1, 0, name="tok")
        | P(operator.getitem, _where_one_hot([2, 1, 0]), 1, name="tok")
        | P(operator.getitem, _where_one_hot([2, 0, 1]), 0, name="tok"))
_SLOT = (P(operator.getitem, P.var("where"), P.var("slot_i"), where=lambda n: len(n.args) == 2)
         | P(aten.select.int, P.var("where"), 1, P.var("slot_i")))
# weights.unsqueeze(-1)[tok, slot] (weights[tok, slot, None] spells the same), or weights[tok, slot].unsqueeze(-1);
# slot the other half of the where
_RW = (P(aten.index.Tensor, P(aten.unsqueeze.default, P.var("weights"), P.var(where=lambda d: d in (2, -1)),
                              name="unsq"), [P.var("tok"), _SLOT], name="rw", users=1)
       | P(aten.unsqueeze.default, P(aten.index.Tensor, P.var("weights"), [P.var("tok"), _SLOT], name="unsq", users=1),
           P.var(where=lambda d: d in (1, -1)), name="rw", users=1)
       # the mask form: (weights * (ids == e)).sum(-1)[sel].unsqueeze(-1)
       | P(aten.unsqueeze.default,
           P(aten.index.Tensor,
             P(aten.sum.dim_IntList, P(aten.mul.Tensor, P.var("weights"), P.var("eq"), commute=True, users=1,
                                       name="w_masked"),
               P.var(where=lambda d: list(d) in ([1], [-1])), users=1, name="w_sum"),
             [P.var("tok")], name="unsq", users=1),
           _LAST, name="rw", users=1))
_GATED = P(aten.mul.Tensor, _act(_linear(_xs(2), "w_gate", name="gate_lin", users=1), name="act", users=1),
           _linear(_xs(2), "w_up", name="up_lin", users=1), commute=True, name="h", users=1)
_UNGATED = _act(_linear(_xs(1), "w_up", name="up_lin", users=1), name="act", users=1)
INDEX_ADD = (aten.index_add.default, aten.index_add_.default)  # out.index_add(...) or out.index_add_(...)
SCATTER_ADD = (aten.scatter_add.default, aten.scatter_add_.default)
INDEX_PUT = (aten.index_put.default, aten.index_put_.default)
COMBINES = INDEX_ADD + SCATTER_ADD + INDEX_PUT  # what sums one expert step into the output
# out = out.index_add(0, tok, linear(h, w_down) * routing weight)
_Y = P(aten.mul.Tensor, _linear(_UNGATED | _GATED, "w_down", name="down_lin", users=1), _RW, commute=True,
       name="y", users=1)
# a cast of each step's output (to another dtype than x's: noop-elimination removed same-dtype casts) is matched
# only so that the report can say why the loop is left alone
_Y_OR_CAST = _Y | P(aten.to.dtype, _Y, P.var("cast"), name="y_cast", users=1)
# out.index_add(0, tok, y); out.scatter_add(0, tok[:, None].expand(-1, d), y); out.index_put((tok,), y, accumulate=True)
STEP = (P(INDEX_ADD, P.var("acc"), 0, _TOK, _Y_OR_CAST, where=lambda n: len(n.args) == 4 and not n.kwargs)
        | P(SCATTER_ADD, P.var("acc"), 0,
            P(aten.expand.default, P(aten.unsqueeze.default, _TOK, P.var(where=lambda d: d in (1, -1)), users=1,
                                     name="tok_col"), P.var("width"), users=1, name="tok_wide"),
            _Y_OR_CAST, where=lambda n: len(n.args) == 4 and not n.kwargs)
        | P(INDEX_PUT, P.var("acc"), [_TOK | _SEL], _Y_OR_CAST, True, where=lambda n: len(n.args) == 4 and not n.kwargs)
        # out[sel] += y: each selected row read, added to and written back once
        | P(INDEX_PUT, P.var("acc"), [_SEL],
            P((aten.add_.Tensor, aten.add.Tensor),
              P(aten.index.Tensor, P.var("acc"), [P.var("tok")], users=1, name="acc_rows"), _Y_OR_CAST,
              users=1, name="acc_sum"),
            where=lambda n: len(n.args) == 3 and not n.kwargs))


def _step(add: fx.Node) -> "tuple[Step, fx.Node, fx.Node, fx.Node, fx.Node] | str | None":
    """(step, x, ids, weights, accumulator) for one combine (``index_add``, ``scatter_add``, accumulating
    ``index_put``), else None; a string where the step matched but is not safe to rewrite (why)."""
    c = STEP.find(add)
    mask = c is not None and c["tok"].target is aten.any.dim
    if c is None or (mask and "w_masked" not in c) or (not mask and c["slot_i"] != 1 - c["tok"].args[-1]):
        return None  # a mask's routing weight must come from the same mask; a where's slot is its other output
    if mask and (val(c["weights"]) is None or tuple(val(c["weights"]).shape) != tuple(val(c["ids"]).shape)):
        return f"{add.name}: the masked routing weights are not one per (token, slot) of the expert ids"
    xv, xsv = val(c["x"]), val(c["xs"])
    if xv is None or xsv is None or xv.dim() != 2 or xsv.dim() != 2 or xsv.shape[-1] != xv.shape[-1]:
        return None
    if "tok_wide" in c:  # scatter_add adds only the index's columns: it must span the whole row
        wide = val(c["tok_wide"])
        if wide is None or wide.dim() != 2 or not isinstance(wide.shape[1], int) or wide.shape[1] != xv.shape[-1]:
            cols = None if wide is None else tuple(wide.shape)[1:]
            return f"{add.name} scatters {cols} columns of each row, the rows have {xv.shape[-1]}"
    gated = "h" in c
    nodes = [add, c["y"], c["rw"], c["down_lin"], c["act"], c["up_lin"], c["xs"], c["unsq"]]
    nodes += [c["h"], c["gate_lin"]] if gated else []
    nodes += [c[k] for k in ("xs_index", "xs_unsq", "gate_lin_mm", "up_lin_mm", "down_lin_mm", "y_cast",
                             "tok_col", "tok_wide", "w_masked", "w_sum", "acc_rows", "acc_sum") if k in c]
    biases = (_bias_of(c["gate_lin"], c, "gate_lin") if gated else None, _bias_of(c["up_lin"], c, "up_lin"),
              _bias_of(c["down_lin"], c, "down_lin"))
    if any(b is False for b in biases) or any(val(c[w]) is None or val(c[w]).dim() != 2
                                              for w in ("w_gate", "w_up", "w_down") if w in c):
        return None
    sized = [c[k] for k in ("xs", "unsq", "acc_rows") if k in c] if mask else []  # boolean indexing: sizes Dynamo checks
    step = Step(c["e"], c["w_gate"] if gated else None, c["w_up"], c["w_down"], activation_of(c["act"])[0],
                nodes, biases, c.get("classes"), c.get("cast"), c["tok"] if mask else c["where"], sized,
                [c["acc_rows"]] if "acc_rows" in c else [])
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
        if (n.target is operator.getitem or n.target in _SIZE_CHECKS
                or (n.target is aten.select.int and n.args[0] is where and n.args[1] == 1)):  # nonzero's columns
            checks.append(n)
            work.extend(n.users)
            continue
        return None
    return checks


def _zeros_like(start, x: fx.Node) -> bool:
    """``zeros_like(x)``, or ``zeros(shape)`` with ``x``'s shape, dtype and device."""
    if not isinstance(start, fx.Node):
        return False
    if start.target is aten.zeros_like.default:
        return start.args[0] is x
    sv, xv = val(start), val(x)
    return (start.target is aten.zeros.default and isinstance(sv, torch.Tensor) and isinstance(xv, torch.Tensor)
            and tuple(sv.shape) == tuple(xv.shape) and sv.dtype == xv.dtype and sv.device == xv.device)


def match(last: fx.Node, misses: Optional[list] = None) -> Optional[Experts]:
    """The expert loop ending in the ``index_add`` ``last``, or None.

    ``misses``: where a chain of expert steps was found but a link of the proof failed, the reason is
    appended (the report names it: a near-miss is not silently left alone).
    """
    steps, cur = [], last
    x = ids = weights = None

    def miss(why: str, step_found: bool = False) -> None:
        if misses is not None and (steps or step_found):
            misses.append(f"expert loop ending at {last.name} ({len(steps)} steps found) left alone: {why}")
        return None

    readers = None  # what may read the partial sum ``cur``: the later step's combine (and its row read)
    while isinstance(cur, fx.Node) and cur.target in COMBINES:
        if readers is not None and not set(cur.users) <= readers:
            return miss(f"the partial sum {cur.name} is read outside the loop")
        found = _step(cur)
        if isinstance(found, str):
            return miss(found, step_found=True)
        if found is None:
            return miss(f"{cur.name} is not an expert step (routing where, gather, MLP, routing weight, "
                        "index_add / scatter_add / accumulating index_put)") if steps else None
        step, sx, sids, sweights, acc = found
        if x is None:
            x, ids, weights = sx, sids, sweights
        if (sx, sids, sweights) != (x, ids, weights):
            return miss("the steps read different tokens, expert ids or routing weights")
        steps.append(step)
        readers = {cur, *step.acc_reads}
        cur = acc
    start = cur
    casts = {s.cast for s in steps if s.cast is not None and s.cast != val(x).dtype}  # to x's dtype: see weights
    if casts:
        return miss(f"each expert's output is cast to {sorted(map(str, casts))} and summed there; the routed op "
                    f"sums in the tokens' dtype {val(x).dtype}")
    if not (_zeros_like(start, x) and set(start.users) <= readers):
        return miss("the sum does not start from zeros of the tokens' shape, dtype and device (used only there)")
    steps.reverse()
    E = len(steps)
    if sorted(s.expert for s in steps) != list(range(E)):
        return miss(f"the steps cover experts {sorted(s.expert for s in steps)}, not 0..{E - 1} once each")
    if len({(s.activation, s.gate is None) for s in steps}) != 1:
        return miss("the experts differ in activation or gating")
    if any(s.classes is not None and s.classes != E for s in steps):
        return miss(f"one_hot over {steps[0].classes} classes, the loop covers {E} experts")
    if not ids_bounded(ids, E):
        return miss(f"the expert ids are not topk indices over {E} experts (a token could go to no looped expert)")
    if val(weights) is None or val(weights).dtype != val(x).dtype:
        return miss(f"routing weights are {getattr(val(weights), 'dtype', None)}, the tokens {val(x).dtype}")
    shapes = {(s.gate is None or tuple(val(s.gate).shape), tuple(val(s.up).shape), tuple(val(s.down).shape),
               tuple(None if b is None else tuple(val(b).shape) for b in s.biases)) for s in steps}
    if len(shapes) != 1:
        return miss("the experts' weights differ in shape, or only some experts have a bias")
    steps.sort(key=lambda s: s.expert)
    step_nodes = {n for s in steps for n in s.nodes}
    wheres = {s.where for s in steps}
    checks = []
    for where in wheres | {n for s in steps for n in s.sized}:
        found = _where_users_ok(where, step_nodes)
        if found is None:
            return miss(f"the routing {where.name} is read outside its step")
        checks += found
    first = steps[0]
    gated = "gated " if first.gate is not None else ""
    return Experts(
        "loop", x, ids, weights, [s.gate for s in steps if s.gate is not None], [s.up for s in steps],
        [s.down for s in steps], first.activation, last,
        [*step_nodes, *checks, *wheres, *(w.args[0] for w in wheres), start],
        biases=tuple([s.biases[i] for s in steps if s.biases[i] is not None] for i in range(3)),
        note=f"{len(steps)} experts, {gated}{first.activation}, from an unrolled loop")
