"""Re-read a boolean mask subgraph as a FlexAttention ``mask_mod``.

A mask built from index arithmetic (``arange``, broadcasting, comparisons,
integer arithmetic) is a function of the query index and the key index
alone. ``lift_mask_mod(keep, L, S)`` returns that function as
``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, or None when the subgraph
reads anything else (a graph input, a random op, an unknown op).

Values are tracked as one of:

- a Python number;
- ``Vec(f)``: a 1-D index vector, ``f(i)`` its element ``i`` (not yet tied
  to a query or key axis);
- ``Grid(f)``: a value over the ``L x S`` score grid, ``f(q_idx, kv_idx)``.

``unsqueeze(vec, 1)`` / ``vec.view(n, 1)`` puts a vector on the query axis,
``unsqueeze(vec, 0)``, ``view(1, n)`` or plain broadcasting against a grid on
the key axis, as PyTorch's broadcasting does.

Before (the mask subgraph)::

    %arange = aten.arange.default(1024)
    %unsqueeze = aten.unsqueeze.default(%arange, 1)        # q index, [L, 1]
    %unsqueeze_1 = aten.unsqueeze.default(%arange, 0)      # kv index, [1, S]
    %sub = aten.sub.Tensor(%unsqueeze, %unsqueeze_1)
    %lt = aten.lt.Scalar(%sub, 256)
    %le = aten.le.Tensor(%unsqueeze_1, %unsqueeze)
    %and = aten.bitwise_and.Tensor(%le, %lt)

After::

    mask_mod = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < 256)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx

from .attention_masks import _arange_length, _skip_full_slices

aten = torch.ops.aten


@dataclass(frozen=True)
class Vec:
    f: Callable[[Any], Any]


@dataclass(frozen=True)
class Grid:
    f: Callable[[Any, Any], Any]


def _on_q(v):
    return Grid(lambda q, kv: v.f(q)) if isinstance(v, Vec) else v


def _on_kv(v):
    return Grid(lambda q, kv: v.f(kv)) if isinstance(v, Vec) else v


def _binary(fn: Callable, a, b):
    if isinstance(a, Grid) or isinstance(b, Grid):
        a, b = _on_kv(a), _on_kv(b)  # a lone vector broadcasts along the last (key) axis
        fa = a.f if isinstance(a, Grid) else (lambda q, kv, c=a: c)
        fb = b.f if isinstance(b, Grid) else (lambda q, kv, c=b: c)
        return Grid(lambda q, kv: fn(fa(q, kv), fb(q, kv)))
    if isinstance(a, Vec) or isinstance(b, Vec):
        fa = a.f if isinstance(a, Vec) else (lambda i, c=a: c)
        fb = b.f if isinstance(b, Vec) else (lambda i, c=b: c)
        return Vec(lambda i: fn(fa(i), fb(i)))
    return fn(a, b)


def _unary(fn: Callable, a):
    if isinstance(a, Grid):
        return Grid(lambda q, kv: fn(a.f(q, kv)))
    if isinstance(a, Vec):
        return Vec(lambda i: fn(a.f(i)))
    return fn(a)


_BINARY = {
    aten.le.Tensor: operator.le, aten.le.Scalar: operator.le,
    aten.lt.Tensor: operator.lt, aten.lt.Scalar: operator.lt,
    aten.ge.Tensor: operator.ge, aten.ge.Scalar: operator.ge,
    aten.gt.Tensor: operator.gt, aten.gt.Scalar: operator.gt,
    aten.eq.Tensor: operator.eq, aten.eq.Scalar: operator.eq,
    aten.ne.Tensor: operator.ne, aten.ne.Scalar: operator.ne,
    aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul, aten.remainder.Scalar: operator.mod,
    aten.remainder.Tensor: operator.mod,
    aten.floor_divide.default: operator.floordiv, aten.floor_divide.Scalar: operator.floordiv,
    aten.bitwise_and.Tensor: operator.and_, aten.bitwise_or.Tensor: operator.or_,
    aten.__and__.Tensor: operator.and_, aten.__or__.Tensor: operator.or_,
    aten.logical_and.default: operator.and_, aten.logical_or.default: operator.or_,
}
_UNARY = {
    aten.bitwise_not.default: operator.invert, aten.logical_not.default: operator.invert,
    aten.abs.default: abs, aten.neg.default: operator.neg,
}


def _lift(node, memo: dict):
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, bool)) else None
    if node in memo:
        return memo[node]
    memo[node] = out = _lift_node(node, memo)
    return out


def _lift_node(node: fx.Node, memo: dict):
    if node.op != "call_function":
        return None
    node = _skip_full_slices(node)
    t, args = node.target, node.args
    if _arange_length(node) is not None:
        return Vec(lambda i: i)
    if t in _BINARY and len(args) == 2 and node.kwargs.get("alpha", 1) == 1:
        a, b = _lift(args[0], memo), _lift(args[1], memo)
        return None if a is None or b is None else _binary(_BINARY[t], a, b)
    if t in _UNARY:
        a = _lift(args[0], memo)
        return None if a is None else _unary(_UNARY[t], a)
    if t is aten.div.Tensor_mode and node.kwargs.get("rounding_mode") == "floor":
        a, b = _lift(args[0], memo), _lift(args[1], memo)
        return None if a is None or b is None else _binary(operator.floordiv, a, b)
    if t is aten.unsqueeze.default:
        a = _lift(args[0], memo)
        if isinstance(a, Vec):
            return _on_q(a) if args[1] in (1, -1) else _on_kv(a) if args[1] in (0, -2) else None
        return None
    if t in (aten.view.default, aten.reshape.default):
        a, shape = _lift(args[0], memo), list(args[1])
        if isinstance(a, Vec) and len(shape) == 2:
            return _on_q(a) if shape[1] == 1 else _on_kv(a) if shape[0] == 1 else None
        return None
    return None


def lift_mask_mod(keep: fx.Node, L: Any = None, S: Any = None) -> Optional[Callable]:
    """``mask_mod(b, h, q_idx, kv_idx)`` equal to the boolean ``keep`` grid, or None.

    With static ``L`` and ``S`` the claim is also proven: the mask subgraph
    (index arithmetic only, so it reads no input) is run for real and must
    equal the lifted function on the whole ``L x S`` grid.
    """
    lifted = _lift(keep, {})
    if not isinstance(lifted, Grid):
        return None
    mask_mod = lambda b, h, q_idx, kv_idx: lifted.f(q_idx, kv_idx)  # noqa: E731
    if isinstance(L, int) and isinstance(S, int) and not _same_on_grid(keep, mask_mod, L, S):
        return None
    return mask_mod


def every_row_attends(mask_mod: Callable, L: Any, S: Any) -> bool:
    """Every query row of the static ``L x S`` grid keeps at least one key (False if not static)."""
    if not (isinstance(L, int) and isinstance(S, int)):
        return False
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(S)[None, :]
        return bool(torch.as_tensor(mask_mod(None, None, q_idx, kv_idx)).expand(L, S).any(-1).all())


def _same_on_grid(keep: fx.Node, mask_mod: Callable, L: int, S: int) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    nodes, seen, work = [], set(), [keep]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call_function":
            return False
        nodes.append(n)
        work.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(keep.graph.nodes)}
    graph, env = fx.Graph(), {}
    for n in sorted(nodes, key=order.__getitem__):
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[keep])
    with unset_fake_temporarily(), torch.no_grad():
        dense = fx.GraphModule(torch.nn.Module(), graph)()
        if not isinstance(dense, torch.Tensor) or dense.dim() < 2 or dense.dtype != torch.bool:
            return False
        dense = dense.reshape(-1, *dense.shape[-2:])
        if dense.shape[0] != 1:
            return False
        q_idx = torch.arange(L, device=dense.device)[:, None]
        kv_idx = torch.arange(S, device=dense.device)[None, :]
        lifted = torch.as_tensor(mask_mod(None, None, q_idx, kv_idx), device=dense.device)
        try:
            return bool(torch.equal(dense[0].expand(L, S), lifted.expand(L, S)))
        except RuntimeError:  # shapes do not broadcast to L x S
            return False


class _Sym:
    """A symbolic index: applying a lifted mask_mod to two of these spells it out."""

    def __init__(self, text: str, prec: int = 9):
        self.text, self.prec = text, prec

    def _bin(self, other, op: str, prec: int, swap: bool = False) -> "_Sym":
        a, b = (_Sym._wrap(other), self) if swap else (self, _Sym._wrap(other))
        left = a.text if a.prec >= prec else f"({a.text})"
        right = b.text if b.prec > prec else f"({b.text})"
        return _Sym(f"{left} {op} {right}", prec)

    @staticmethod
    def _wrap(x) -> "_Sym":
        return x if isinstance(x, _Sym) else _Sym(repr(x))

    def __str__(self) -> str:
        return self.text


_PRECEDENCE = {"|": 1, "&": 3, "==": 0, "!=": 0, "<": 0, "<=": 0, ">": 0, ">=": 0,  # as in Python
               "+": 5, "-": 5, "*": 6, "//": 6, "%": 6}
for _name, _op in (("or", "|"), ("and", "&"), ("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="),
                   ("gt", ">"), ("ge", ">="), ("add", "+"), ("sub", "-"), ("mul", "*"),
                   ("floordiv", "//"), ("mod", "%")):
    setattr(_Sym, f"__{_name}__", lambda self, o, _op=_op: self._bin(o, _op, _PRECEDENCE[_op]))
    if _name in ("or", "and", "add", "sub", "mul", "floordiv", "mod"):
        setattr(_Sym, f"__r{_name}__", lambda self, o, _op=_op: self._bin(o, _op, _PRECEDENCE[_op], swap=True))
_Sym.__invert__ = lambda self: _Sym(f"~({self.text})", 8)
_Sym.__neg__ = lambda self: _Sym(f"-({self.text})", 8)
_Sym.__abs__ = lambda self: _Sym(f"abs({self.text})", 9)


def describe(mask_mod: Callable) -> str:
    """The lifted mask as an expression in ``q_idx`` and ``kv_idx`` (also its cache key)."""
    return str(mask_mod(_Sym("b"), _Sym("h"), _Sym("q_idx"), _Sym("kv_idx")))
