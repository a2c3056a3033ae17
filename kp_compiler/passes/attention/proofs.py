"""Facts about a lifted ``mask_mod`` that hold for every length, proven with ``sympy``.

With static lengths the lifted mask is checked on the whole grid
(``mask_mod.every_row_attends``). With symbolic lengths there is no grid, so
``keeps_diagonal`` evaluates the mask on symbols instead: ``q_idx`` and
``kv_idx`` become the same non-negative integer symbol ``i`` and sympy must
simplify the result to ``True``. A mask that keeps ``(i, i)`` for every
``i`` leaves no query row empty whenever ``L <= S`` (row ``i`` keeps key
``i``), which is what FlexAttention needs to agree with eager (an empty row
is NaN or uniform in eager, zeros in flex).

Only exact integer and boolean operations are modelled (``+ - * // % abs``,
comparisons, ``& | ~``); anything else (a float division, a tensor, a
symbolic length captured by the mask) fails the proof.

Before::

    mask_mod = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < 1024)

After::

    keeps_diagonal(mask_mod) -> True   # Le(i, i) & (0 < 1024) simplifies to True
"""

from __future__ import annotations

import operator
from typing import Callable

import sympy


_BOOLEAN = (sympy.logic.boolalg.BooleanAtom, sympy.logic.boolalg.BooleanFunction, sympy.core.relational.Relational)


class _Z:
    """An exact integer or boolean sympy expression under Python's operators."""

    __slots__ = ("e",)

    def __init__(self, e):
        self.e = e

    @staticmethod
    def of(x) -> "_Z":
        if isinstance(x, _Z):
            return x
        if isinstance(x, bool):
            return _Z(sympy.true if x else sympy.false)
        if isinstance(x, int):
            return _Z(sympy.Integer(x))
        raise TypeError(f"not modelled exactly: {type(x).__name__}")

    def _is_bool(self) -> bool:
        return isinstance(self.e, _BOOLEAN)

    def _num(self):
        if self._is_bool():
            raise TypeError("a boolean in integer arithmetic")
        return self.e

    def _bool(self):
        if not self._is_bool():
            raise TypeError("an integer in boolean logic")
        return self.e


def _arith(fn):
    return (lambda a, b: _Z(fn(_Z.of(a)._num(), _Z.of(b)._num())),
            lambda a, b: _Z(fn(_Z.of(b)._num(), _Z.of(a)._num())))


def _logic(fn):
    return (lambda a, b: _Z(fn(_Z.of(a)._bool(), _Z.of(b)._bool())),
            lambda a, b: _Z(fn(_Z.of(b)._bool(), _Z.of(a)._bool())))


for _name, _fn in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("floordiv", lambda x, y: sympy.floor(x / y)), ("mod", sympy.Mod)):
    setattr(_Z, f"__{_name}__", _arith(_fn)[0])
    setattr(_Z, f"__r{_name}__", _arith(_fn)[1])
for _name, _fn in (("and", sympy.And), ("or", sympy.Or)):
    setattr(_Z, f"__{_name}__", _logic(_fn)[0])
    setattr(_Z, f"__r{_name}__", _logic(_fn)[1])
for _name, _fn in (("lt", sympy.Lt), ("le", sympy.Le), ("gt", sympy.Gt), ("ge", sympy.Ge),
                   ("eq", sympy.Eq), ("ne", sympy.Ne)):
    setattr(_Z, f"__{_name}__", lambda a, b, _fn=_fn: _Z(_fn(_Z.of(a)._num(), _Z.of(b)._num())))
_Z.__invert__ = lambda a: _Z(sympy.Not(a._bool()))
_Z.__neg__ = lambda a: _Z(-a._num())
_Z.__abs__ = lambda a: _Z(sympy.Abs(a._num()))
_Z.__hash__ = None  # type: ignore[assignment]
_Z.__bool__ = lambda a: (_ for _ in ()).throw(TypeError("a symbolic condition used as a Python bool"))


def keeps_diagonal(mask_mod: Callable) -> bool:
    """``mask_mod(b, h, i, i)`` is True for every integer ``i >= 0`` (sympy proves it, or False)."""
    i = sympy.Symbol("i", integer=True, nonnegative=True)
    try:
        kept = _Z.of(mask_mod(0, 0, _Z(i), _Z(i)))._bool()
        return bool(sympy.simplify(kept) == sympy.true)
    except (TypeError, AttributeError, ValueError, ZeroDivisionError):
        return False
