"""What a node in an attention chain holds: a float cast's dtype, a constant scalar, a mask fill.

The matcher (``match.py``) asks these questions of the nodes its patterns
visit; they read the graph and never change it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx

from ...core.graph import val
from ...core.pattern import number

aten = torch.ops.aten

CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)


def cast_dtype(node: fx.Node):
    """The floating dtype a pure cast converts to (None if ``node`` is not one).

    Casts to integer or bool dtypes truncate: they are never looked through.
    """
    dtype = None
    if node.target is aten.to.dtype:
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    elif node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}:
        dtype = node.kwargs.get("dtype")
    elif node.target is aten.type_as.default and isinstance(val(node.args[1]), torch.Tensor):
        dtype = val(node.args[1]).dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def const_scalar(arg) -> Optional[float]:
    """A Python number, or the value of a 0-dim ``full([], c)`` / ``scalar_tensor(c)`` / tensor-constant node."""
    if number(arg):
        return arg
    if not isinstance(arg, fx.Node) or arg.op != "call_function":
        return None
    if arg.target is aten.full.default and list(arg.args[0]) == [] and number(arg.args[1]):
        return arg.args[1]
    if arg.target is aten.scalar_tensor.default and number(arg.args[0]):
        return arg.args[0]
    if arg.target is aten.zeros.default and list(arg.args[0]) == []:
        return 0
    return _tensor_constant(arg)


def _tensor_constant(arg) -> Optional[float]:
    """The value of a one-element tensor constant, ``detach_(lift_fresh_copy(_tensor_constant0))``
    (how Dynamo records ``torch.tensor(0.0)`` written in model code, e.g. transformers 5.17's masks)."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (
            aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default, aten.clone.default):
        arg = arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = getattr(arg.graph.owning_module, arg.target, None)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() != 0:
        return None
    return value.item()


def sym_sqrt_of(arg) -> Optional[fx.Node]:
    """The SymInt node ``e`` when ``arg`` is ``sqrt(float(e))`` (``math.sqrt(q.size(-1))`` traced)."""
    if not isinstance(arg, fx.Node) or getattr(arg.target, "__name__", "") != "_sym_sqrt":
        return None
    inner = arg.args[0]
    if not isinstance(inner, fx.Node) or getattr(inner.target, "__name__", "") != "sym_float":
        return None
    e = inner.args[0]
    return e if isinstance(e, fx.Node) and isinstance(val(e), torch.SymInt) else None


def is_mask_fill(x) -> bool:
    """``-inf``, or a finite fill of -1e4 or lower (``finfo.min``)."""
    return number(x) and (x == -math.inf or x <= -1e4)


def bias_as_keep(bias: fx.Node):
    """(keep or ("not", masked_out), fill) when ``bias`` is 0 where kept and a -1e4-or-lower fill elsewhere."""
    while isinstance(bias, fx.Node) and bias.target in CASTS and cast_dtype(bias) is not None:
        bias = bias.args[0]
    if not isinstance(bias, fx.Node) or bias.op != "call_function":
        return None
    if bias.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
        cond, a, b = bias.args[:3]
        a, b = const_scalar(a), const_scalar(b)
        if a == 0 and is_mask_fill(b):
            return cond, b
        if b == 0 and is_mask_fill(a):
            return ("not", cond), a
        return None
    if bias.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _all_zeros(bias.args[0]):
        fill = const_scalar(bias.args[2])
        return (("not", bias.args[1]), fill) if is_mask_fill(fill) else None
    return None


def _all_zeros(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    return node.target in (aten.full.default, aten.full_like.default) and node.args[1] == 0
