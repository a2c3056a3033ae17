"""The routed-experts backward as of 3c7e78b (before the fused elementwise pass), for comparison in
``scripts/gpu_moe_layer_check.py``."""

import torch

from kp_compiler.ops.grouped_experts import _combine, _linear, _sort_by_expert, _stack
from kp_compiler.ops.routed_experts import ACTIVATIONS, act_backward, num_experts


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
