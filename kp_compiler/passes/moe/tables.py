"""The last step of ``moe-dispatch`` in inference graphs: ``kp::routed_experts`` reads its expert weights through
address tables made at compile time (``ops/routed_experts_tables.py``) instead of taking 3 x E tensors per call.

Before::

    %routed_experts = kp.routed_experts.default(%x, %ids, %w, [%g_0, ..., %g_63], [%u_0, ...], [%d_0, ...], 'silu')

After (``3``: the handle of the tables; a hook re-points them before every call if a weight moved)::

    %routed_experts = kp.routed_experts_tables.default(%x, %ids, %w, 3, 'silu')

Only where all of these hold (else the op stays as it is; where the graph qualifies but an op does not, the
report's note says why):

- the graph is compiled without a backward (``Target.training`` false) and switches grad mode nowhere;
- the target is a CUDA device where Triton's kernels run the op (``routed_experts_tables.fused_kernels``);
- every expert weight is a graph input (a parameter as Dynamo passes it), one 2-D tensor per expert, and the
  kernels can read them (``triton_experts.supported``); the op has no biases.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import erase_dead
from ...core.pattern import is_call
from ...ops import routed_experts_tables

_data_ptr = torch.Tensor.data_ptr
_GRAD_MODE = {torch._C._set_grad_enabled, torch.enable_grad, torch.set_grad_enabled}


class RefreshTables:
    """The hook (``PassContext.hooks``): before each call, the weights' addresses against the tables'."""

    def __init__(self, handle: int, inputs: tuple, sizes: tuple):
        self.handle, self.inputs, self.sizes = handle, inputs, sizes  # sizes: weights per role (gate, up, down)
        self._get = operator.itemgetter(*inputs)
        self._entry = routed_experts_tables.entry(handle)

    def __call__(self, args) -> None:
        weights = self._get(args)
        if tuple(map(_data_ptr, weights)) != self._entry.addresses:
            g, u = self.sizes[0], self.sizes[0] + self.sizes[1]
            self._entry.refresh(weights[:g], weights[g:u], weights[u:])

    def __repr__(self) -> str:
        return f"RefreshTables(handle={self.handle}, inputs={len(self.inputs)})"


def why_not(ctx) -> Optional[str]:
    """None where the graph may take the tables op at all, else why not."""
    target = getattr(ctx, "target", None)
    if target is None:
        return "no compile target known (a pass run by hand)"
    if target.training:
        return "a backward may run (the tables op has no autograd formula)"
    if not routed_experts_tables.fused_kernels(target.device):
        return f"no Triton kernels for the op on {target.device.kind}"
    return None


def tabulate(gm: fx.GraphModule) -> tuple[int, list]:
    """Rewrite every ``kp::routed_experts`` of ``gm`` that qualifies; (how many, notes on the others)."""
    ctx = context.current()
    nodes = [n for n in gm.graph.nodes if is_call(n, torch.ops.kp.routed_experts.default)]
    if not nodes:
        return 0, []
    why = why_not(ctx)
    if why is None and any(n.op == "call_function" and n.target in _GRAD_MODE for n in gm.graph.nodes):
        why = "the graph switches grad mode"
    if why is not None:  # said nowhere: true of every training graph and every graph off CUDA
        return 0, []
    done, notes = 0, []
    for node in nodes:
        note = _rewrite(gm, node, ctx)
        if note is None:
            done += 1
        elif note not in notes:
            notes.append(note)
    if done:
        notes.append(f"{done} routed-experts op(s) read their weights through address tables (inference graph)")
    return done, notes


def _rewrite(gm: fx.GraphModule, node: fx.Node, ctx) -> Optional[str]:
    x, ids, weights, w_gate, w_up, w_down, activation = node.args
    roles = (list(w_gate), list(w_up), list(w_down))
    if not all(isinstance(w, fx.Node) and w.op == "placeholder" for ws in roles for w in ws):
        return "expert weights passed per call: one is not a graph input"
    values = [[ctx.example_value(w) for w in ws] for ws in roles]
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if x_val is None or not all(isinstance(v, torch.Tensor) for vs in values for v in vs):
        return "expert weights passed per call: no example value"
    if not all(type(v) in (torch.Tensor, torch.nn.Parameter) for vs in values for v in vs):
        return "expert weights passed per call: a weight is a tensor subclass (its address is not its data's)"
    handle = routed_experts_tables.make(x_val, *values)
    if handle is None:
        return "expert weights passed per call: the kernels cannot read them in place (stacked, unaligned)"
    inputs = tuple(ctx.graph_inputs.index(w) for ws in roles for w in ws)
    ctx.hooks.append(RefreshTables(handle, inputs, tuple(map(len, roles))))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.kp.routed_experts_tables.default,
                                     (x, ids, weights, handle, activation))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    erase_dead([node])
    return None
