"""Re-read a boolean mask subgraph as a FlexAttention ``mask_mod``.

A mask built from index arithmetic (``arange``, broadcasting, comparisons,
integer arithmetic) is a function of the query index and the key index
alone. ``lift_mask_mod(keep, L, S)`` returns that function as
``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, or None when the subgraph
reads anything else (a graph input, a random op, an unknown op).

Values are Python numbers or ``Field``s: a tensor's shape and a function
from an index (one per dim, counted from the right as broadcasting aligns
them) to its element. ``arange``, ``unsqueeze``, views that add or drop
size-1 dims, ``expand`` and elementwise ops are modelled exactly, size-1
dims included (they read index 0). At the end the last dim is the key axis
and the one before it the query axis; any dim further left must be size 1
(a mask that varies over batch or heads is not lifted). With static lengths
the lift is also checked against the real mask on the whole grid; with
symbolic lengths the lift itself is the proof, so it is accepted only for
bool, int32 and int64 arithmetic, which Python ints model exactly.

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
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx


from ...core.graph import val
from ...core.pattern import number
from .masks import _arange_length, _skip_full_slices
from .subgraph import evaluate
from .fields import Field, _Sym, _broadcast_to, _known, _result_shape  # noqa: F401  (re-exported)
from .proofs import keeps_diagonal
from .reads import DATA_KEY, read_field
from .value_masks import recognise

aten = torch.ops.aten


EVERY_KEY_KEPT = "kv_idx >= 0"  # describe() of a lifted mask whose grid is one constant True
_memo: Optional[dict] = None  # (keep node, L, S) -> lifted mask_mod or None, inside memoized()
_ROWS: dict = {}  # (describe(mask_mod), L, S) -> every row keeps a key


def _binary(fn: Callable, a, b):
    fields = [x for x in (a, b) if isinstance(x, Field)]
    if not fields:
        return fn(a, b)
    if fn is operator.and_ and (a is True or b is True):  # new_ones(..., dtype=bool) & mask
        return b if a is True else a
    shape = _result_shape(*(x.shape for x in fields))
    a = _broadcast_to(a, shape) if isinstance(a, Field) else a
    b = _broadcast_to(b, shape) if isinstance(b, Field) else b
    if a is None or b is None:
        return None
    fa = a.f if isinstance(a, Field) else (lambda ix, c=a: c)
    fb = b.f if isinstance(b, Field) else (lambda ix, c=b: c)
    return Field(lambda ix: fn(fa(ix), fb(ix)), shape)


def _unary(fn: Callable, a):
    return Field(lambda ix: fn(a.f(ix)), a.shape) if isinstance(a, Field) else fn(a)


def _unsqueeze(a: Field, dim: int) -> Field:
    r = len(a.shape)
    d = dim if dim >= 0 else dim + r + 1
    cut = r - d  # old positions above this one move one to the left

    def f(ix, g=a.f):
        return g({p: ix[p + 1] if p > cut else ix[p] for p in range(1, r + 1)})
    return Field(f, a.shape[:d] + (1,) + a.shape[d:])


def _view(a: Field, shape: tuple) -> Optional[Field]:
    """A view that only adds or drops size-1 dims."""
    def big(s):
        return [(p, s[-p]) for p in range(1, len(s) + 1) if not _known(s[-p] == 1)]
    old, new = big(a.shape), big(shape)
    if len(old) != len(new) or not all(_known(x[1] == y[1]) for x, y in zip(old, new)):
        return None
    moved = {po: pn for (po, _), (pn, _) in zip(old, new)}

    def f(ix, g=a.f):
        return g({p: ix[moved[p]] if p in moved else 0 for p in range(1, len(a.shape) + 1)})
    return Field(f, tuple(shape))

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
    # float arithmetic, for score biases (ALiBi): proven on the real grid like every lift
    aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv, aten.mul.Scalar: operator.mul,
    aten.pow.Scalar: operator.pow, aten.pow.Tensor_Scalar: operator.pow, aten.pow.Tensor_Tensor: operator.pow,
}
_UNARY = {
    aten.bitwise_not.default: operator.invert, aten.logical_not.default: operator.invert,
    aten.abs.default: abs, aten.neg.default: operator.neg,
}


def _lift(node, memo: dict):
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, bool, float)) else None
    if node in memo:
        return memo[node]
    memo[node] = out = _lift_node(node, memo)
    return out


def _lift_node(node: fx.Node, memo: dict):
    if node.op != "call_function":
        return None
    node = _skip_full_slices(node)
    t, args = node.target, node.args
    n = _arange_length(node)
    if n is not None:  # a symbolic length arrives as the SymInt's node: the shape holds the SymInt itself
        return Field(lambda ix: ix[1], (val(n) if isinstance(n, fx.Node) else n,))
    if t in (aten.arange.start, aten.arange.start_step) and isinstance(val(node), torch.Tensor):
        start, step = args[0], (args[2] if len(args) > 2 else 1)
        if number(start) and number(step) and isinstance(val(node).shape[0], int):
            return Field(lambda ix: start + step * ix[1], (val(node).shape[0],))
        return None
    if t is aten.index.Tensor:  # a per-row tensor read at index positions (padding, document ids)
        return read_field(node, memo, _lift)
    if t in _BINARY and len(args) == 2 and node.kwargs.get("alpha", 1) == 1:
        a, b = _lift(args[0], memo), _lift(args[1], memo)
        return None if a is None or b is None else _binary(_BINARY[t], a, b)
    if t in _UNARY:
        a = _lift(args[0], memo)
        return None if a is None else _unary(_UNARY[t], a)
    if t is aten.div.Tensor_mode and node.kwargs.get("rounding_mode") == "floor":
        a, b = _lift(args[0], memo), _lift(args[1], memo)
        return None if a is None or b is None else _binary(operator.floordiv, a, b)
    const = _zero_dim_constant(node)
    if const is not None:
        return const
    a = _lift(args[0], memo) if args else None
    out = val(node)
    if not isinstance(a, Field) or not isinstance(out, torch.Tensor):
        return None
    if t is aten.unsqueeze.default:
        return _unsqueeze(a, args[1])
    if t is aten.clamp.default:
        lo = args[1] if len(args) > 1 else node.kwargs.get("min")
        hi = args[2] if len(args) > 2 else node.kwargs.get("max")
        ok = all(x is None or number(x) for x in (lo, hi))
        return _unary(lambda x: _clamp(x, lo, hi), a) if ok else None
    if t in (aten.to.dtype, aten._to_copy.default) and out.dtype.is_floating_point:
        return a  # computed in float32 inside flex; the grid proof bounds the difference
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return _view(a, tuple(out.shape))
    if t in (aten.expand.default, aten.expand_as.default):
        return _broadcast_to(a, tuple(out.shape))
    return None


def _clamp(x, lo, hi):
    if isinstance(x, _Sym):
        return _Sym(f"clamp({x.text}, {lo}, {hi})")
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=lo, max=hi)
    return min(max(x, lo if lo is not None else x), hi if hi is not None else x)


def _zero_dim_constant(node: fx.Node):
    """A 0-dim ``ones``/``new_ones``/``full``/``scalar_tensor`` as a Python number (bool for bool dtype)."""
    t, args = node.target, node.args
    if t in (aten.ones.default, aten.new_ones.default, aten.full.default):
        shape = args[1] if t is aten.new_ones.default else args[0]
        value = 1 if t is not aten.full.default else (args[1] if len(args) > 1 else None)
    elif t is aten.scalar_tensor.default:
        shape, value = [], args[0]
    else:
        return None
    if list(shape) != [] or not isinstance(value, (int, bool, float)) or isinstance(value, float) and not value.is_integer():
        return None
    return bool(value) if node.kwargs.get("dtype") is torch.bool else int(value)


def lift_mask_mod(keep: fx.Node, L: Any = None, S: Any = None) -> Optional[Callable]:
    """``mask_mod(b, h, q_idx, kv_idx)`` equal to the boolean ``keep`` grid, or None.

    A mask this module cannot read op by op may still be recognised by its
    value (``value_masks.py``). With static ``L`` and ``S`` the claim is also proven: the mask subgraph
    (index arithmetic only, so it reads no input) is run for real and must
    equal the lifted function on the whole ``L x S`` grid.
    """
    if _memo is None or not (isinstance(L, int) and isinstance(S, int)):
        return _lift_and_prove(keep, L, S)  # symbolic lengths: no grid proof to save (and SymInts don't hash)
    if (keep, L, S) not in _memo:
        _memo[(keep, L, S)] = _lift_and_prove(keep, L, S)
    return _memo[(keep, L, S)]


@contextlib.contextmanager
def memoized() -> Iterator[None]:
    """Within this block, lift each (mask node, L, S) once: transformers shares one mask node across
    all layers, and each proof runs the mask on the whole grid."""
    global _memo
    previous, _memo = _memo, {}
    try:
        yield
    finally:
        _memo = previous


def _lift_and_prove(keep: fx.Node, L: Any, S: Any) -> Optional[Callable]:
    memo: dict = {}
    lifted = _lift(keep, memo)
    if memo.get(DATA_KEY):  # it reads a tensor: one the graph makes from no input is a fact at static lengths,
        return recognise(keep, L, S)  # else data_masks.lift_data_mask's case
    if not isinstance(lifted, Field) or len(lifted.shape) > 4:
        return recognise(keep, L, S)  # ops no mask_mod spells (gathers, cumsum): by value, if it reads no input
    # Only the query and key axes may vary: batch and head dims must be size 1 (broadcast).
    if any(not _known(lifted.shape[-p] == 1) for p in range(3, len(lifted.shape) + 1)):
        return recognise(keep, L, S)  # e.g. expanded over the batch: the same grid for each batch, by value
    rank = len(lifted.shape)
    ones = {p for p in (1, 2) if p <= rank and _known(lifted.shape[-p] == 1)}
    for p, size in ((1, S), (2, L)):  # the mask must cover the scores' grid, or broadcast along it
        if size is not None and p <= rank and p not in ones and not _known(lifted.shape[-p] == size):
            return None

    def mask_mod(b, h, q_idx, kv_idx):
        ix = {1: 0 if 1 in ones else kv_idx, 2: 0 if 2 in ones else q_idx}
        kept = lifted.f({p: ix.get(p, 0) for p in range(1, rank + 1)})
        if isinstance(kept, (bool, int)):  # a constant grid (a 1 x 1 decode mask): flex wants a tensor
            return kv_idx >= 0 if kept else kv_idx < 0
        return kept
    if isinstance(L, int) and isinstance(S, int):
        return mask_mod if _same_on_grid(keep, mask_mod, L, S) else None
    return mask_mod if _exactly_modelled(keep) else None


_EXACT_DTYPES = (torch.bool, torch.int32, torch.int64)


def _exactly_modelled(keep: fx.Node, stop: frozenset = frozenset()) -> bool:
    """Every tensor behind ``keep`` (up to the ``stop`` nodes, data read as it is) is bool, int32 or int64:
    Python ints model that arithmetic exactly.

    Without a grid to run (symbolic lengths) the lift is the only proof, and it
    models float casts, float arithmetic and narrow integers (which wrap)
    only approximately; those are left to the static-length grid proof.
    """
    seen, work = set(), [keep]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        v = val(n)
        if isinstance(v, torch.Tensor) and v.dtype not in _EXACT_DTYPES:
            return False
        if n not in stop:
            work.extend(n.all_input_nodes)
    return True


def every_row_attends(mask_mod: Callable, L: Any, S: Any) -> bool:
    """Every query row of the ``L x S`` grid keeps at least one key.

    Static lengths: checked on the grid, cached by the mask's spelled-out
    expression (``describe``) and lengths (layers share masks). Symbolic
    lengths: ``L <= S`` must be known and sympy must prove the mask keeps the
    diagonal (``proofs.keeps_diagonal``); otherwise False.
    """
    if not (isinstance(L, int) and isinstance(S, int)):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(L <= S) and keeps_diagonal(mask_mod)
    key = (describe(mask_mod), L, S)
    if key not in _ROWS:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(S)[None, :]
            dense = torch.as_tensor(mask_mod(None, None, q_idx, kv_idx)).expand(L, S)
            _ROWS[key] = bool(dense.any(-1).all())
        if len(_ROWS) > 256:
            _ROWS.pop(next(iter(_ROWS)))
    return _ROWS[key]


def _same_on_grid(keep: fx.Node, mask_mod: Callable, L: int, S: int) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    dense = evaluate(keep)
    with unset_fake_temporarily(), torch.no_grad():
        if dense is None or dense.dim() < 2 or dense.dtype != torch.bool:
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


def describe(mask_mod: Callable) -> str:
    """The lifted mask as an expression in ``q_idx`` and ``kv_idx`` (also its cache key)."""
    return str(mask_mod(_Sym("b"), _Sym("h"), _Sym("q_idx"), _Sym("kv_idx")))
