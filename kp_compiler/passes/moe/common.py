"""What the three expert-form recognizers share (``loop.py``, ``batched.py``, ``dense.py``): activations, routing ids."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core.graph import val

aten = torch.ops.aten


def activation_of(node) -> Optional[tuple[str, fx.Node]]:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.silu.default:
        return "silu", node.args[0]
    if node.target is aten.relu.default:
        return "relu", node.args[0]
    if node.target is aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0]
    return None


def ids_bounded(ids: fx.Node, experts: int) -> bool:
    """``ids`` is ``topk(p, k)[1]`` with ``p``'s last dim ``experts``: every id is a looped expert."""
    if not (ids.target is operator.getitem and ids.args[1] == 1):
        return False
    topk = ids.args[0]
    if not (isinstance(topk, fx.Node) and topk.target is aten.topk.default):
        return False
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    probs = val(topk.args[0])
    return isinstance(probs, torch.Tensor) and dim in (-1, probs.dim() - 1) and probs.shape[-1] == experts
