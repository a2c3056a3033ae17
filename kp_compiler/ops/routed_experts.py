"""``kp::routed_experts``: top-k routed MLP experts (gated or not) as one op.

``routed_experts(x, ids, weights, w_gate, w_up, w_down, activation)`` computes,
for tokens ``x [T, d]`` routed to experts ``ids [T, k]`` with weights
``weights [T, k]``::

    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])
    expert_e(x) = (act(x @ w_gate[e].T) * (x @ w_up[e].T)) @ w_down[e].T     # gated (SwiGLU, GEGLU)
    expert_e(x) = act(x @ w_up[e].T) @ w_down[e].T                           # w_gate == [] (GELU, ReLU MLPs)

``w_gate``, ``w_up``, ``w_down`` are lists with one weight per expert (the
model's own parameters, so gradients reach them; nothing is stacked), or each
one 3-D tensor ``[E, f, d]`` holding all experts (a model's stacked
parameter, or a slice of one such as the gate half of ``gate_up [E, 2f, d]``);
its gradient then comes back stacked too, one tensor instead of E views.
``activation`` is ``"silu"`` (SwiGLU), ``"gelu"``, ``"gelu_tanh"`` (GEGLU) or
``"relu"``. The reference implementation is the expert loop itself, in the
same order as model code writes it; the backward is its own op
(``kp::routed_experts_backward``), so AOTAutograd and Inductor see two
opaque calls with fake implementations, and no data-dependent shape. The
backward is written out per expert (gated-MLP derivatives through ATen's
activation backward ops).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS, act_backward  # noqa: F401  (re-exported: the expert modules read them here)



def stacked(ws: Sequence) -> bool:
    """The role is given as one 3-D tensor ``[E, rows, cols]``."""
    return len(ws) == 1 and ws[0].dim() == 3


def num_experts(ws: Sequence) -> int:
    """How many experts a role holds (no per-expert views made: those cost host time per call)."""
    return ws[0].shape[0] if stacked(ws) else len(ws)


def per_expert(ws: Sequence) -> list:
    """One 2-D weight per expert (views of a stacked tensor)."""
    return list(ws[0].unbind(0)) if stacked(ws) else list(ws)


NO_BIASES = ((), (), ())


def _bias(biases: Sequence, e: int):
    return biases[e] if biases else None


def reference(x, ids, weights, w_gate: Sequence, w_up: Sequence, w_down: Sequence, activation: str,
              biases=NO_BIASES):
    """The expert loop, as model code writes it (differentiable). ``biases``: per-expert bias lists
    ``(b_gate, b_up, b_down)``, each empty for a role without bias."""
    act = ACTIVATIONS[activation]
    w_gate, w_up, w_down = per_expert(w_gate), per_expert(w_up), per_expert(w_down)
    b_gate, b_up, b_down = biases
    out = x.new_zeros(x.shape)
    for e in range(len(w_up)):
        tok, slot = torch.where(ids == e)
        xs = x[tok]
        up = F.linear(xs, w_up[e], _bias(b_up, e))
        h = act(F.linear(xs, w_gate[e], _bias(b_gate, e))) * up if w_gate else act(up)
        y = F.linear(h, w_down[e], _bias(b_down, e)) * weights[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out


@torch.library.custom_op("kp::routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    w_gate: list[torch.Tensor], w_up: list[torch.Tensor], w_down: list[torch.Tensor], activation: str,
) -> torch.Tensor:
    _check(x, ids, weights, w_gate, w_up, w_down, activation)
    with torch.no_grad():
        return reference(x, ids, weights, w_gate, w_up, w_down, activation)


@routed_experts.register_fake
def _(x, ids, weights, w_gate, w_up, w_down, activation):
    return x.new_empty(x.shape)  # contiguous, as every implementation returns it


@torch.library.custom_op("kp::routed_experts_backward", mutates_args=())
def routed_experts_backward(
    grad: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    w_gate: list[torch.Tensor], w_up: list[torch.Tensor], w_down: list[torch.Tensor],
    b_gate: list[torch.Tensor], b_up: list[torch.Tensor], b_down: list[torch.Tensor], activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weights, the expert weights and the expert biases, stacked ``[E, ...]`` per role.

    Stacked because a custom op's outputs may not alias each other; the autograd
    formula unbinds them into one gradient per expert parameter. A role that is
    absent (``w_gate == []``, or no bias) gets an empty gradient. Written out per
    expert (no autograd inside an op). Shared by ``kp::routed_experts`` (no biases)
    and ``kp::routed_experts_biased``.
    """
    return reference_backward(grad, x, ids, weights, w_gate, w_up, w_down, activation, (b_gate, b_up, b_down))


def reference_backward(grad, x, ids, weights, w_gate, w_up, w_down, activation: str, biases=NO_BIASES):
    act = ACTIVATIONS[activation]
    w_gate, w_up, w_down = per_expert(w_gate), per_expert(w_up), per_expert(w_down)
    b_gate, b_up, b_down = biases
    grad_x, grad_weights = x.new_zeros(x.shape), weights.new_zeros(weights.shape)
    grad_gate, grad_up, grad_down, grad_b_gate, grad_b_up, grad_b_down = [], [], [], [], [], []
    for e in range(len(w_up)):
        tok, slot = torch.where(ids == e)
        xs, gs, r = x[tok], grad[tok], weights[tok, slot]
        hu = F.linear(xs, w_up[e], _bias(b_up, e))
        if w_gate:
            hg = F.linear(xs, w_gate[e], _bias(b_gate, e))
            a = act(hg)
            h = a * hu
        else:
            h = act(hu)
        y = F.linear(h, w_down[e], _bias(b_down, e))
        grad_weights.index_put_((tok, slot), (gs * y).sum(-1), accumulate=True)
        dy = gs * r[:, None]
        dh = dy @ w_down[e]
        grad_down.append(dy.t() @ h)
        grad_b_down.append(dy.sum(0))
        if w_gate:
            dhu, dhg = dh * a, act_backward(activation, dh * hu, hg)
            grad_gate.append(dhg.t() @ xs)
            grad_b_gate.append(dhg.sum(0))
            dxs = dhg @ w_gate[e] + dhu @ w_up[e]
        else:
            dhu = act_backward(activation, dh, hu)
            dxs = dhu @ w_up[e]
        grad_up.append(dhu.t() @ xs)
        grad_b_up.append(dhu.sum(0))
        grad_x.index_add_(0, tok, dxs)
    return (grad_x, grad_weights, _stack(grad_gate, x), torch.stack(grad_up), torch.stack(grad_down),
            _stack(grad_b_gate if b_gate else [], x), _stack(grad_b_up if b_up else [], x),
            _stack(grad_b_down if b_down else [], x))


def _stack(grads: list, like: torch.Tensor) -> torch.Tensor:
    return torch.stack(grads) if grads else like.new_empty(0)


@routed_experts_backward.register_fake
def _(grad, x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    def grads(ws):
        if not ws:
            return x.new_empty(0)
        return x.new_empty(ws[0].shape) if stacked(ws) else x.new_empty(len(ws), *ws[0].shape)
    # contiguous, as every implementation returns them (empty_like would copy a transposed input's strides)
    return (x.new_empty(x.shape), weights.new_empty(weights.shape), grads(w_gate), grads(w_up), grads(w_down),
            grads(b_gate), grads(b_up), grads(b_down))


def _setup_context(ctx, inputs, output):
    x, ids, weights, w_gate, w_up, w_down, activation = inputs
    ctx.save_for_backward(x, ids, weights, *w_gate, *w_up, *w_down)
    ctx.gates, ctx.experts, ctx.activation = len(w_gate), len(w_up), activation
    ctx.stacked = stacked(w_up)


def _backward(ctx, grad):
    x, ids, weights, *ws = ctx.saved_tensors
    G, E = ctx.gates, ctx.experts
    gx, gw, gg, gu, gd, *_ = torch.ops.kp.routed_experts_backward(
        grad, x, ids, weights, ws[:G], ws[G:G + E], ws[G + E:], [], [], [], ctx.activation)
    if ctx.stacked:  # one 3-D weight per role: its gradient as it is
        return gx, None, gw, [gg] if G else [], [gu], [gd], None
    return gx, None, gw, list(gg.unbind(0)) if G else [], list(gu.unbind(0)), list(gd.unbind(0)), None


routed_experts.register_autograd(_backward, setup_context=_setup_context)


def _check(x, ids, weights, w_gate, w_up, w_down, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"kp::routed_experts: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not w_up or len({stacked(ws) for ws in (w_gate, w_up, w_down) if ws}) != 1:
        raise ValueError("kp::routed_experts: give every role as one weight per expert or as one 3-D tensor")
    counts = {num_experts(ws) for ws in (w_gate, w_up, w_down) if ws}
    if len(counts) != 1:
        raise ValueError("kp::routed_experts: w_up and w_down (and w_gate, unless empty) need one weight per expert")
    if x.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"kp::routed_experts: x must be [T, d] and ids, weights [T, k]; got "
                         f"{tuple(x.shape)}, {tuple(ids.shape)}, {tuple(weights.shape)}")
