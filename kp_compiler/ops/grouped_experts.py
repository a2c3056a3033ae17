"""Routed experts through ``torch._grouped_mm``: tokens sorted by expert, three grouped GEMMs.

The same math as ``routed_experts.reference`` (``kp::routed_experts``), for
devices and dtypes where ``torch._grouped_mm`` runs (CUDA 9.0 in bf16; the
CPU in torch 2.13 for tests). Inner dims must keep 16-byte aligned strides.
The expert weights are stacked per call (a copy of all expert weights:
measure before choosing this path); ``lowering/moe.py`` decides where.

``backward`` is ``kp::routed_experts_backward`` the same way: the gate/up
GEMMs are recomputed, the weight gradients are grouped GEMMs whose groups
run along the token dimension (``[D, P] @ [P, F] -> [E, D, F]``), and an
expert with no tokens gets zeros (its group is empty; on Hopper the kernel
writes zeros, pytorch/pytorch#172439 reports otherwise on Blackwell, where
this path is not chosen).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .routed_experts import ACTIVATIONS, act_backward, num_experts, stacked


def _stack(ws) -> torch.Tensor:
    """``[E, rows, cols]``: the model's stacked weight as it is, else a stacked copy."""
    return ws[0] if stacked(ws) else torch.stack(list(ws))


def aligned(x: torch.Tensor, w_up: Sequence[torch.Tensor]) -> bool:
    """Row strides of every operand are 16-byte multiples (``_grouped_mm``'s requirement)."""
    f, d = w_up[0].shape[-2:]
    return (d * x.element_size()) % 16 == 0 and (f * x.element_size()) % 16 == 0


def _sort_by_expert(ids: torch.Tensor, experts: int):
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # no bincount: it reads the max back to the host
    return order, offs


def _linear(inp, ws, bs, offs, expert):
    """``inp @ w[e].T + b[e]`` for rows sorted by expert (``expert``: each row's expert)."""
    out = torch._grouped_mm(inp, _stack(ws).transpose(1, 2), offs=offs)
    return out + torch.stack(list(bs))[expert] if bs else out


def forward(x, ids, weights, w_gate, w_up, w_down, activation: str, biases=((), (), ())) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    b_gate, b_up, b_down = biases
    k = ids.shape[1]
    order, offs = _sort_by_expert(ids, num_experts(w_up))
    tokens, expert = order // k, ids.reshape(-1)[order]
    xs = x[tokens]
    up = _linear(xs, w_up, b_up, offs, expert)
    h = act(_linear(xs, w_gate, b_gate, offs, expert)) * up if w_gate else act(up)
    y = _linear(h, w_down, b_down, offs, expert)
    y = y * weights.flatten()[order, None]
    return _combine(y, order, k)


def _combine(rows: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Sum each token's ``k`` rows (given sorted by expert): put them back in assignment order (each
    position written once: no atomics, deterministic), then ``view(T, k, -1).sum(1)``."""
    out = rows.new_empty(rows.shape).index_copy_(0, order, rows)
    return out.view(-1, k, rows.shape[-1]).sum(1)


def backward(grad, x, ids, weights, w_gate, w_up, w_down, activation: str, biases=((), (), ())):
    """``(grad_x, grad_weights, grad_gate [E, F, D] or empty, grad_up [E, F, D], grad_down [E, D, F],
    grad_b_gate [E, F] or empty, grad_b_up, grad_b_down)``; the bias gradients are empty without biases."""
    act = ACTIVATIONS[activation]
    b_gate, b_up, b_down = biases
    T, k = ids.shape
    E = num_experts(w_up)
    order, offs = _sort_by_expert(ids, E)
    tokens, expert = order // k, ids.reshape(-1)[order]
    xs, gs = x[tokens], grad[tokens]
    route = weights.reshape(-1)[order, None]
    up_w = _stack(w_up)  # [E, F, D]
    down_w = _stack(w_down)  # [E, D, F]
    u = _linear(xs, w_up, b_up, offs, expert)
    g_dh = torch._grouped_mm(gs, down_w, offs=offs)  # grad @ w_down[e]: dh before the routing weight
    if w_gate:
        gate_w = _stack(w_gate)
        g = _linear(xs, w_gate, b_gate, offs, expert)
        a = act(g)
        h = a * u
    else:
        h = act(u)
    grad_route = (h.float() * g_dh.float()).sum(-1)
    if b_down:
        grad_route = grad_route + (gs.float() * torch.stack(list(b_down))[expert].float()).sum(-1)
    dh = g_dh * route
    dy = gs * route
    grad_down = torch._grouped_mm(dy.t(), h, offs=offs)
    if w_gate:
        du, dg = dh * a, act_backward(activation, dh * u, g)
        grad_gate = torch._grouped_mm(dg.t(), xs, offs=offs)
        dxs = torch._grouped_mm(dg, gate_w, offs=offs) + torch._grouped_mm(du, up_w, offs=offs)
    else:
        du, dg, grad_gate = act_backward(activation, dh, u), None, x.new_empty(0)
        dxs = torch._grouped_mm(du, up_w, offs=offs)
    grad_up = torch._grouped_mm(du.t(), xs, offs=offs)
    grad_x = _combine(dxs, order, k)
    grad_weights = torch.zeros(T * k, device=x.device, dtype=torch.float32).index_put_((order,), grad_route)

    def bias_grad(present, rows):
        return x.new_zeros(E, rows.shape[1]).index_add_(0, expert, rows) if present else x.new_empty(0)
    return (grad_x, grad_weights.view(T, k).to(weights.dtype), grad_gate, grad_up, grad_down,
            bias_grad(b_gate, dg), bias_grad(b_up, du), bias_grad(b_down, dy))
