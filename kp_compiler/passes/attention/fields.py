"""Index-arithmetic tensors as functions of an index (``Field``), and symbols that spell a lifted mask out.

``mask_mod.py`` lifts a mask subgraph op by op into ``Field``s; ``reads.py``
adds reads of a per-row tensor; ``describe`` applies a lifted function to
``_Sym``s to print it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch.fx.experimental.symbolic_shapes import statically_known_true


@dataclass(frozen=True)
class Field:
    """An index-arithmetic tensor: ``f(ix)`` is its element at ``ix``.

    ``ix`` maps a position counted from the right (1 = last dim, the key
    axis of the scores; 2 = the query axis; 3 = heads; 4 = batch) to an
    index. ``shape`` is the tensor's shape; its size-1 dims read index 0.
    """

    f: Callable[[dict], Any]
    shape: tuple


def _known(pred) -> bool:
    try:
        return bool(statically_known_true(pred))
    except Exception:  # noqa: BLE001 - an unknown symbolic relation is not a proof
        return False


def _broadcast_to(a: Field, shape: tuple) -> Optional[Field]:
    """``a`` read inside a broadcast result of ``shape``: its size-1 dims read index 0."""
    if len(a.shape) > len(shape):
        return None
    ones = []
    for p in range(1, len(a.shape) + 1):
        size, out = a.shape[-p], shape[-p]
        if _known(size == 1) and not _known(out == 1):
            ones.append(p)
        elif not _known(size == out):
            return None  # sizes not provably equal: no claim
    if not ones:
        return Field(a.f, tuple(shape))
    return Field(lambda ix, f=a.f: f({**ix, **{p: 0 for p in ones}}), tuple(shape))


def _result_shape(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for p in range(rank, 0, -1):
        big = [s[-p] for s in shapes if len(s) >= p and not _known(s[-p] == 1)]
        out.append(big[0] if big else 1)
    return tuple(out)


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
               "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "**": 7}
for _name, _op in (("or", "|"), ("and", "&"), ("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="),
                   ("gt", ">"), ("ge", ">="), ("add", "+"), ("sub", "-"), ("mul", "*"), ("truediv", "/"),
                   ("floordiv", "//"), ("mod", "%"), ("pow", "**")):
    setattr(_Sym, f"__{_name}__", lambda self, o, _op=_op: self._bin(o, _op, _PRECEDENCE[_op]))
    if _name in ("or", "and", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(_Sym, f"__r{_name}__", lambda self, o, _op=_op: self._bin(o, _op, _PRECEDENCE[_op], swap=True))
_Sym.__invert__ = lambda self: _Sym(f"~({self.text})", 8)
_Sym.__neg__ = lambda self: _Sym(f"-({self.text})", 8)
_Sym.__abs__ = lambda self: _Sym(f"abs({self.text})", 9)
