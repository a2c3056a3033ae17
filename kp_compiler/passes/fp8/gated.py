"""The ``fp8-linear`` step's last rewrite: a training graph's converted gated MLP onto ``kp::fp8_gated_mlp_train``.

Runs on what ``fp8_linears`` emitted for a SwiGLU/GEGLU MLP in a training
graph (default recipe): gate and up projections sharing one cast of ``x``,
the activation and the product, and the down projection's training op.
``ops/fp8_gated.py`` computes the same three FP8 GEMMs with the product (and,
in the backward, its gradients) cast to FP8 without a 16-bit copy.

Before::

    %fp8_linear_shared = kp.fp8_linear_shared.default(%x, %qx, %qxt, %sx, %w_gate, None, e4m3, e5m2, True)
    %getitem_3 = getitem(%fp8_linear_shared, 0)
    %fp8_linear_shared_1 = kp.fp8_linear_shared.default(%x, %qx, %qxt, %sx, %w_up, None, e4m3, e5m2, True)
    %getitem_4 = getitem(%fp8_linear_shared_1, 0)
    %silu = aten.silu.default(%getitem_3)
    %mul = aten.mul.Tensor(%silu, %getitem_4)
    %fp8_linear_train = kp.fp8_linear_train.default(%mul, %w_down, None, e4m3, e5m2, True)
    %getitem_5 = getitem(%fp8_linear_train, 0)

After::

    %fp8_gated_mlp_train = kp.fp8_gated_mlp_train.default(%x, %qx, %qxt, %sx, %w_gate, %w_up, %w_down, 'silu', ...)
    %getitem_5 = getitem(%fp8_gated_mlp_train, 0)

Only where nothing else reads the gate or up output, the activation or the
product (the op keeps them inside), no linear has a bias, the three share
their FP8 formats and fast-accumulation flag, and ``x`` and the weights
share a dtype; the activation is ``silu``, ``gelu`` or ``gelu`` tanh.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core.graph import erase_dead, val
from ...ops import fp8_gated as _fp8_gated  # noqa: F401  (registers kp::fp8_gated_mlp_train)
from ...ops.fp8_gated_quant import GATED
from ..linear.activation import ACT, activation_of

aten, kp = torch.ops.aten, torch.ops.kp


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _projection(out: fx.Node) -> Optional[fx.Node]:
    """The bias-free ``kp::fp8_linear_shared`` whose output 0 is ``out``, read by nothing else."""
    if not (out.op == "call_function" and out.target is operator.getitem and out.args[1] == 0):
        return None
    op = out.args[0]
    if not (isinstance(op, fx.Node) and op.target is kp.fp8_linear_shared.default and op.args[5] is None):
        return None
    return op if _only_user(op) is out and len(out.users) == 1 else None


def match(down: fx.Node) -> Optional[dict]:
    """The parts of a gated MLP ending in the training op ``down``, or None."""
    if down.target is not kp.fp8_linear_train.default or down.args[2] is not None:
        return None
    h = down.args[0]
    if not (isinstance(h, fx.Node) and h.target is aten.mul.Tensor and _only_user(h) is down):
        return None
    for act, up_out in (h.args, h.args[::-1]):
        if not (isinstance(act, fx.Node) and isinstance(up_out, fx.Node) and act.target in ACT):
            continue
        name = activation_of(act)
        gate_out = act.args[0]
        if name not in GATED or _only_user(act) is not h or not isinstance(gate_out, fx.Node):
            continue
        gate, up = _projection(gate_out), _projection(up_out)
        if gate is None or up is None or gate is up or _only_user(gate_out) is not act:
            continue
        if gate.args[:4] != up.args[:4] or gate.args[6:] != up.args[6:] or tuple(gate.args[6:]) != down.args[3:]:
            continue  # another cast of x, other formats or accumulation
        weights = (gate.args[4], up.args[4], down.args[1])
        if len({val(n).dtype for n in (gate.args[0], *weights)}) != 1:
            continue
        return dict(gate=gate, up=up, act=act, h=h, name=name, weights=weights)
    return None


def fuse_gated_mlps(gm: fx.GraphModule) -> int:
    """Rewrite every gated MLP ``match`` finds; the number rewritten."""
    graph, fused = gm.graph, 0
    for down in list(graph.nodes):
        if down.op != "call_function":
            continue
        found = match(down)
        out = _only_user(down)
        if found is None or out is None or out.target is not operator.getitem or out.args[1] != 0:
            continue
        gate, up = found["gate"], found["up"]
        with graph.inserting_before(down):
            op = graph.call_function(kp.fp8_gated_mlp_train.default,
                                     (*gate.args[:4], *found["weights"], found["name"], *gate.args[6:]))
            new = graph.call_function(operator.getitem, (op, 0))
        new.meta["val"] = val(out)
        new.meta["kp_note"] = f"fp8: gated MLP ({found['name']}) in one op, the product's casts fused"
        out.replace_all_uses_with(new)
        erase_dead([out, down, found["h"], found["act"], *gate.users, gate, *up.users, up])
        fused += 1
    return fused
