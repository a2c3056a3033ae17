"""What the three expert-form recognizers share (``loop.py``, ``batched.py``, ``dense.py``): activations, routing ids."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from ... import ops  # noqa: F401  (registers kp::routed_experts and kp::routed_experts_biased)
from ...core.graph import erase_dead, val

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


@dataclass
class Experts:
    """One recognized expert block, whichever form it was written in: what ``emit`` turns into one op.

    ``gate``/``up``/``down`` hold one weight node per expert (a loop over
    ``nn.Linear`` experts) or one stacked ``[E, ...]`` node each (batched and
    dense forms); ``gate_up`` is a stacked ``[E, 2f, d]`` gate-then-up weight
    that ``emit`` slices into the two. ``nodes`` is everything the form alone
    uses: ``emit`` declines if any of them is read outside it, else erases them.
    """

    form: str  # "loop", "batched", "dense": the report's kind suffix
    x: fx.Node
    ids: fx.Node
    weights: fx.Node
    gate: list
    up: list
    down: list
    activation: str
    end: fx.Node  # the node the op's result replaces
    nodes: list
    biases: tuple = ((), (), ())  # (gate, up, down) bias nodes, per expert; empty without biases
    gate_up: Optional[fx.Node] = None
    grouped: bool = False  # transformers' grouped_mm form
    note: str = ""  # kp_note on the emitted op

    @property
    def kind(self) -> str:
        """The report's match key: ``[gated-]<activation>[-biased][-<form>]`` (the loop form has no suffix)."""
        gated = "gated-" if self.gate or self.gate_up is not None else ""
        biased = "-biased" if any(self.biases) else ""
        return gated + self.activation + biased + ("" if self.form == "loop" else f"-{self.form}")


def _saved_value(e: Experts, gate: list, up: list):
    """The fake ``saved`` output of ``kp::routed_experts_train``, as its fake implementation makes it."""
    from ...ops.routed_experts_train import saved_like
    x, ids, ups = val(e.x), val(e.ids), [val(u) for u in up]
    if x is None or ids is None or any(u is None for u in ups):
        return None
    return saved_like(x, ids, gate, ups)


def emit(gm: fx.GraphModule, e: Experts, training: bool = False) -> bool:
    """Replace ``e`` by one ``kp::routed_experts`` (or ``_biased``) call; False (graph untouched)
    if a value inside the form is read outside it. In a graph compiled with a backward (``training``),
    experts without biases get ``kp::routed_experts_train`` instead (its forward keeps the pre-activations
    its backward would recompute, ``ops/routed_experts_train.py``), read through ``getitem(..., 0)``."""
    inside = set(e.nodes) | {e.end}
    if any(n is not e.end and any(u not in inside for u in n.users) for n in inside):
        return False
    g = gm.graph
    dtype = val(e.x).dtype
    with g.inserting_before(e.end):
        weights = e.weights
        if val(weights).dtype != dtype:
            weights = g.call_function(aten.to.dtype, (weights, dtype))
        gate, up = list(e.gate), list(e.up)
        if e.gate_up is not None:  # the stacked halves, so the gradient is one slice_backward each
            f = val(e.gate_up).shape[1] // 2
            gate = [g.call_function(aten.slice.Tensor, (e.gate_up, 1, 0, f))]
            up = [g.call_function(aten.slice.Tensor, (e.gate_up, 1, f, 2 * f))]
        if any(e.biases):
            op = out = g.call_function(torch.ops.kp.routed_experts_biased.default, (
                e.x, e.ids, weights, gate, up, list(e.down), *map(list, e.biases), e.activation))
        elif training:
            op = g.call_function(torch.ops.kp.routed_experts_train.default,
                                 (e.x, e.ids, weights, gate, up, list(e.down), e.activation))
            op.meta["val"] = (val(e.end), _saved_value(e, gate, up))
            out = g.call_function(operator.getitem, (op, 0))
        else:
            op = out = g.call_function(torch.ops.kp.routed_experts.default,
                                       (e.x, e.ids, weights, gate, up, list(e.down), e.activation))
        result = out
        if val(e.end).dtype != dtype:
            result = g.call_function(aten.to.dtype, (out, val(e.end).dtype))
    if result is out:
        out.meta["val"] = val(e.end)
    if e.note:
        op.meta["kp_note"] = e.note
    e.end.replace_all_uses_with(result)
    erase_dead(inside)
    return True
