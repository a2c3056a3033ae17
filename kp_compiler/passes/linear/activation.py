"""``linear-activation``: a linear and the activation that reads it onto one op (issue 19, opt-in).

Matches, in the canonical graph:

- gated: ``act(linear(x, w_gate, b_gate?)) * linear(x, w_up, b_up?)`` (either
  order of the product) -> ``kp::gated_linear`` (SwiGLU with ``silu``, GEGLU
  with ``gelu`` exact or tanh);
- ``act(linear(x, w, b?))`` for ``silu``, ``gelu`` (exact or tanh), ``relu``
  -> ``kp::linear_act``.

Training graphs get the ``_train`` variants, which also return the
pre-activations for the backward (``ops/linear_act.py``).

Preconditions, per match: each weight is a parameter of the graph (a
placeholder, or a tensor-parallel parameter's local shard; a weight computed
in the graph is left alone); the
pre-activations and the activation have no other user (a second reader
would need the value the op keeps inside); ``x``, weights and biases share
one dtype; the two gated weights have one shape.

Opt-in (``options={"passes": [..., "linear-activation"]}``): the ops run
their ATen reference until a fused kernel exists and is measured faster than
Inductor's own path, which fuses the activation into one pointwise kernel.

Before::

    %linear = aten.linear.default(%x, %w_gate) : f32[4, 24]
    %silu = aten.silu.default(%linear) : f32[4, 24]
    %linear_1 = aten.linear.default(%x, %w_up) : f32[4, 24]
    %mul = aten.mul.Tensor(%silu, %linear_1) : f32[4, 24]

After::

    %gated_linear_default = kp.gated_linear.default(%x, %w_gate, %w_up, None, None, 'silu') : f32[4, 24]
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import erase_dead, val
from ...core.pattern import P
from ...core.rules import Matches
from ...ops import linear_act as _linear_act  # noqa: F401  (registers kp::linear_act, kp::gated_linear)
from ..tp_rewrite import is_parameter

aten, kp = torch.ops.aten, torch.ops.kp

ACT = (aten.silu.default, aten.gelu.default, aten.relu.default)
x = P.var("x")
# one user each: the op keeps the pre-activation and the activation inside
GATE = P(ACT, P(aten.linear.default, x, P.var("w_gate"), users=1, name="gate_linear"), users=1, name="act")
UP = P(aten.linear.default, x, P.var("w_up"), users=1, name="up_linear")
GATED = P(aten.mul.Tensor, GATE, UP, commute=True)
SINGLE = P(ACT, P(aten.linear.default, x, P.var("w"), users=1, name="linear"))


def activation_of(node: fx.Node) -> str:
    """``silu``, ``relu``, ``gelu`` or ``gelu_tanh`` for an activation node of ``ACT``."""
    if node.target is aten.gelu.default:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return "silu" if node.target is aten.silu.default else "relu"


def _bias(linear: fx.Node) -> Optional[fx.Node]:
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def applies(target, options) -> Optional[str]:
    """Not under ``torch.autocast``: the ops have no autocast rule (they would run and return the fp32 inputs'
    dtype where eager's linears take the autocast dtype)."""
    if getattr(target, "autocast", False):
        return ("torch.autocast is on: kp::linear_act and kp::gated_linear have no autocast rule, so they would "
                "return fp32 where eager's linears return the autocast dtype")
    return None


def refusal(x: fx.Node, linears: list) -> Optional[str]:
    """Why these linears of ``x`` may not become one op, or None."""
    ctx = context.current()
    weights = [lin.args[1] for lin in linears]
    for w in weights:
        if not (isinstance(w, fx.Node) and w.op == "placeholder"):
            return f"{w}: the weight is not a parameter of the graph"
        if ctx is not None and not is_parameter(w, ctx.example_value(w)):  # or a TP parameter's local shard
            return f"{w.name}: the weight is a graph input, not a parameter"
    xv = val(x)
    values = [val(w) for w in weights] + [val(b) for b in map(_bias, linears) if b is not None]
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point():
        return "x is not a floating tensor"
    if any(not isinstance(v, torch.Tensor) or v.dtype != xv.dtype for v in values):
        return "x, the weights and the biases do not share one dtype"
    if len(weights) == 2 and val(weights[0]).shape != val(weights[1]).shape:
        return "the gate and up weights differ in shape"
    return None


def _gated(found: dict, root: fx.Node, train: bool) -> tuple:
    """``(linears, op, args, replaced nodes)`` for a gated match."""
    gate, up = found["gate_linear"], found["up_linear"]
    op = kp.gated_linear_train.default if train else kp.gated_linear.default
    args = (found["x"], gate.args[1], up.args[1], _bias(gate), _bias(up), activation_of(found["act"]))
    return [gate, up], op, args, [root, found["act"], gate, up]


def _single(found: dict, root: fx.Node, train: bool) -> tuple:
    linear = found["linear"]
    op = kp.linear_act_train.default if train else kp.linear_act.default
    return [linear], op, (found["x"], linear.args[1], _bias(linear), activation_of(root)), [root, linear]


# The gated forms first: their gate is also a single ``act(linear)``.
FORMS = (("gated", GATED, _gated), ("single", SINGLE, _single))


def linear_activation(gm: fx.GraphModule) -> Matches:
    """Rewrite every match of ``FORMS`` in order; a refused one gets a note saying why."""
    ctx = context.current()
    train = bool(ctx is not None and ctx.target is not None and ctx.target.training)
    counts, notes = {}, []
    graph = gm.graph
    for rule, pattern, build in FORMS:
        for node in list(graph.nodes):
            found = pattern.find(node) if node.op == "call_function" else None
            if found is None:
                continue
            linears, op, args, old = build(found, node, train)
            why = refusal(found["x"], linears)
            if why is not None:
                notes.append(f"{node.name}: left alone: {why}")
                continue
            # the op's output has the activation's value; the _train variants add the linears' (pre-activations)
            value = (val(node), *map(val, linears)) if train else val(node)
            with graph.inserting_before(node):
                fused = graph.call_function(op, args)
                fused.meta["val"] = value
                out = fused
                if train:  # the graph reads the output
                    out = graph.call_function(operator.getitem, (fused, 0))
                    out.meta["val"] = value[0]
            node.replace_all_uses_with(out)
            erase_dead(old)
            counts[rule] = counts.get(rule, 0) + 1
    graph.lint()
    return Matches(counts, notes)
