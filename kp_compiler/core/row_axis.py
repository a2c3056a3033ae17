"""The batch axis of the row-independence proof (``rows.py``, ``row_rules.py``): what a tensor's state is,
how a dim holding the batch size is found, and the error that ends a proof."""

from __future__ import annotations

from typing import Optional

import sympy
import torch
from torch import fx

FREE = None  # the state of a value that holds no batch rows


class Broken(Exception):
    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"{node.name} ({node.target}): {why}")
        self.node, self.why = node, why


def expr_of(size) -> sympy.Expr:
    return sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else size)


def holds(size, symbol) -> bool:
    return symbol in expr_of(size).free_symbols


def axis_of(t: torch.Tensor, symbol, node) -> Optional[int]:
    """The one dim of ``t`` whose size holds ``symbol`` as ``symbol * c`` (``c`` free of it), or FREE."""
    dims = [d for d, s in enumerate(t.shape) if holds(s, symbol)]
    if not dims:
        return FREE
    if len(dims) > 1:
        raise Broken(node, f"the batch size is in dims {dims} of one tensor")
    ratio = sympy.simplify(expr_of(t.shape[dims[0]]) / symbol)
    if symbol in ratio.free_symbols:
        raise Broken(node, f"dim {dims[0]} has size {t.shape[dims[0]]}, not a multiple of the batch size")
    return dims[0]


def op_name(target) -> str:
    packet = getattr(target, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
    return name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
