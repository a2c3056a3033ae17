"""``kp::routed_experts_biased``: ``kp::routed_experts`` for experts whose linears carry biases.

``routed_experts_biased(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation)``::

    expert_e(x) = (act(x @ w_gate[e].T + b_gate[e]) * (x @ w_up[e].T + b_up[e])) @ w_down[e].T + b_down[e]

Each bias list holds one ``[rows]`` bias per expert, or is empty for a role
without bias (``w_gate == []`` needs ``b_gate == []``). A separate op because
``torch.library`` schemas give a ``Tensor[]`` argument no default; the backward
is the shared ``kp::routed_experts_backward``.
"""

from __future__ import annotations

import torch

from .routed_experts import _check, reference


@torch.library.custom_op("kp::routed_experts_biased", mutates_args=())
def routed_experts_biased(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    w_gate: list[torch.Tensor], w_up: list[torch.Tensor], w_down: list[torch.Tensor],
    b_gate: list[torch.Tensor], b_up: list[torch.Tensor], b_down: list[torch.Tensor], activation: str,
) -> torch.Tensor:
    check_biases(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation)
    with torch.no_grad():
        return reference(x, ids, weights, w_gate, w_up, w_down, activation, (b_gate, b_up, b_down))


@routed_experts_biased.register_fake
def _(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    return x.new_empty(x.shape)  # contiguous, as every implementation returns it


def check_biases(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation) -> None:
    _check(x, ids, weights, w_gate, w_up, w_down, activation)
    for name, ws, bs in (("gate", w_gate, b_gate), ("up", w_up, b_up), ("down", w_down, b_down)):
        if not bs:
            continue
        if len(bs) != len(ws) or any(b.dim() != 1 or b.shape[0] != w.shape[0] for b, w in zip(bs, ws)):
            raise ValueError(f"kp::routed_experts_biased: b_{name} needs one [rows] bias per w_{name} expert weight")


def _setup_context(ctx, inputs, output):
    x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation = inputs
    ctx.save_for_backward(x, ids, weights, *w_gate, *w_up, *w_down, *b_gate, *b_up, *b_down)
    ctx.sizes = [len(t) for t in (w_gate, w_up, w_down, b_gate, b_up, b_down)]
    ctx.activation = activation


def _backward(ctx, grad):
    x, ids, weights, *rest = ctx.saved_tensors
    groups, at = [], 0
    for n in ctx.sizes:
        groups.append(rest[at:at + n])
        at += n
    gx, gw, *stacked = torch.ops.kp.routed_experts_backward(grad, x, ids, weights, *groups, ctx.activation)
    per_expert = [list(g.unbind(0)) if n else [] for g, n in zip(stacked, ctx.sizes)]
    return (gx, None, gw, *per_expert, None)


routed_experts_biased.register_autograd(_backward, setup_context=_setup_context)
