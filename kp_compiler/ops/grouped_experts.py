"""Routed experts through ``torch._grouped_mm``: tokens sorted by expert, three grouped GEMMs.

The same math as ``routed_experts.reference`` (``kp::routed_experts``), for
devices and dtypes where ``torch._grouped_mm`` runs (CUDA 9.0 in bf16; the
CPU in torch 2.13 for tests). Inner dims must keep 16-byte aligned strides.
Per-expert weight lists are stacked per call (a copy of all expert weights,
once per role: measure before choosing this path); ``lowering/moe.py``
decides where. The backward packs a list's gate and up into one
``[E, 2f, d]`` copy (``packed_gate_up``), so the recompute and ``dx`` are one
GEMM each.

``backward`` is ``kp::routed_experts_backward`` the same way: the gate/up
GEMMs are recomputed, the weight gradients are grouped GEMMs whose groups
run along the token dimension (``[D, P] @ [P, F] -> [E, D, F]``), and an
expert with no tokens gets zeros (its group is empty; on Hopper the kernel
writes zeros, pytorch/pytorch#172439 reports otherwise on Blackwell, where
this path is not chosen).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from . import expert_grads
from .routed_experts import ACTIVATIONS, num_experts, stacked

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _stack(ws) -> torch.Tensor:
    """``[E, rows, cols]``: the model's stacked weight as it is, else a stacked copy."""
    return ws[0] if stacked(ws) else torch.stack(list(ws))


def aligned(x: torch.Tensor, w_up: Sequence[torch.Tensor]) -> bool:
    """Row strides of every operand are 16-byte multiples (``_grouped_mm``'s requirement)."""
    f, d = w_up[0].shape[-2:]
    return (d * x.element_size()) % 16 == 0 and (f * x.element_size()) % 16 == 0


def _sort_by_expert(ids: torch.Tensor, experts: int):
    """``(order, offs)``: assignments sorted by expert (stable) and each expert's end in that order (int32).
    One Triton launch on CUDA (``triton_routing.sort_by_expert``: an ATen sort and scan are about ten
    launches, each with its host time); ATen ops elsewhere."""
    if ids.is_cuda and _HAS_TRITON:
        from .triton_routing import sort_by_expert
        order, offs = sort_by_expert(ids.contiguous(), experts)
        return order.long(), offs
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # no bincount: it reads the max back to the host
    return order, offs


def _linear(inp, ws, bs, offs, expert):
    """``inp @ w[e].T + b[e]`` for rows sorted by expert (``expert``: each row's expert); ``ws`` a role or
    its ``[E, rows, cols]`` stack."""
    out = torch._grouped_mm(inp, (ws if isinstance(ws, torch.Tensor) else _stack(ws)).transpose(1, 2), offs=offs)
    return out + torch.stack(list(bs))[expert] if bs else out


def forward(x, ids, weights, w_gate, w_up, w_down, activation: str, biases=((), (), ()), save: bool = False):
    """The output ``[T, d]``; with ``save`` (no biases), ``(output, saved)``: ``saved`` the gate and up
    pre-activations sorted by expert (``[T*k, 2f]``, gate then up; ``[T*k, f]`` ungated), which
    ``backward(..., saved=saved)`` reads instead of recomputing them. A list's gate and up are packed into
    one ``[E, 2f, d]`` copy for it (``packed_gate_up``)."""
    act = ACTIVATIONS[activation]
    b_gate, b_up, b_down = biases
    if save and any(biases):
        raise ValueError("grouped_experts.forward: save=True takes experts without biases")
    k = ids.shape[1]
    order, offs = _sort_by_expert(ids, num_experts(w_up))
    tokens, expert = order // k, ids.reshape(-1)[order]
    xs = x[tokens]
    gate_up = packed_gate_up(w_gate, w_up) if save else side_by_side(w_gate, w_up)
    if gate_up is not None:  # one GEMM over [gate | up]
        f = w_up[0].shape[-2]
        gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
        gate = gu[:, :f] + _rows(b_gate, expert) if b_gate else gu[:, :f]
        h = act(gate) * (gu[:, f:] + _rows(b_up, expert) if b_up else gu[:, f:])
        saved = gu
    elif save and w_gate:  # separate 3-D roles, read in place: two GEMMs, their outputs side by side
        f = w_up[0].shape[-2]
        saved = torch.cat([_linear(xs, w_gate, (), offs, expert), _linear(xs, w_up, (), offs, expert)], 1)
        h = act(saved[:, :f]) * saved[:, f:]
    else:
        up = _linear(xs, w_up, b_up, offs, expert)
        h = act(_linear(xs, w_gate, b_gate, offs, expert)) * up if w_gate else act(up)
        saved = up
    y = _linear(h, w_down, b_down, offs, expert)
    y = y * weights.flatten()[order, None]
    out = _combine(y, order, k)
    return (out, saved) if save else out


def _combine(rows: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Sum each token's ``k`` rows (given sorted by expert): put them back in assignment order (each
    position written once: no atomics, deterministic), then ``view(T, k, -1).sum(1)``."""
    out = rows.new_empty(rows.shape).index_copy_(0, order, rows)
    return out.view(-1, k, rows.shape[-1]).sum(1)


def side_by_side(w_gate, w_up) -> "torch.Tensor | None":
    """``[E, 2f, d]``: the gate and up roles as one tensor, where they are the two halves of one
    parameter in that order (transformers' ``gate_up_proj``); else None. Only a view, never a copy."""
    if not (w_gate and stacked(w_gate) and stacked(w_up)):
        return None
    g, u = w_gate[0], w_up[0]
    E, f, d = g.shape
    if (u.shape != g.shape or u.stride() != g.stride() or u.dtype != g.dtype or g.stride(2) != 1
            or g.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
            or u.storage_offset() != g.storage_offset() + f * g.stride(1) or g.stride(0) < 2 * f * g.stride(1)):
        return None
    return g.as_strided((E, 2 * f, d), g.stride())


def packed_gate_up(w_gate, w_up) -> "torch.Tensor | None":
    """``[E, 2f, d]`` gate and up for the backward's GEMMs: ``side_by_side``'s view where the model keeps
    them so; for per-expert lists (which the GEMMs need stacked anyway) one copy of both roles, made once
    per call (it was stacked once per GEMM that reads it: four copies of the two roles); else None
    (separate 3-D roles are read in place, two GEMMs where one would do)."""
    view = side_by_side(w_gate, w_up)
    if view is not None or not w_gate or stacked(w_up):
        return view
    (f, d), E = w_up[0].shape, len(w_up)
    packed = w_up[0].new_empty(E, 2 * f, d)
    torch._foreach_copy_([*packed[:, :f].unbind(0), *packed[:, f:].unbind(0)], [*w_gate, *w_up])
    return packed


def _rows(bs, expert):
    return torch.stack(list(bs))[expert]


def backward(grad, x, ids, weights, w_gate, w_up, w_down, activation: str, biases=((), (), ()), saved=None):
    """``(grad_x, grad_weights, grad_gate [E, F, D] or empty, grad_up [E, F, D], grad_down [E, D, F],
    grad_b_gate [E, F] or empty, grad_b_up, grad_b_down)``; the bias gradients are empty without biases.

    Grouped GEMMs around one elementwise pass (``expert_grads``): gate/up recomputed (one GEMM over
    ``[gate | up]`` where the model keeps them side by side or they are lists, ``packed_gate_up``) unless
    ``forward(..., save=True)`` kept them (``saved``), ``grad @ w_down[e]``, then the weight gradients and
    ``dx`` (again one GEMM over ``[dg | du]`` against ``gate_up``).
    """
    if saved is not None and any(biases):
        raise ValueError("grouped_experts.backward: saved pre-activations are taken for experts without biases")
    b_gate, b_up, b_down = biases
    T, k = ids.shape
    E = num_experts(w_up)
    order, offs = _sort_by_expert(ids, E)
    tokens, expert = order // k, ids.reshape(-1)[order]
    xs, gs = x[tokens], grad[tokens]
    route = weights.reshape(-1)[order]
    rows, f = xs.shape[0], (w_up[0].shape[1] if stacked(w_up) else w_up[0].shape[0])
    gate_up = packed_gate_up(w_gate, w_up)
    if saved is not None:  # the forward's pre-activations, sorted as here (the same stable sort)
        g, u = (saved[:, :f], saved[:, f:]) if w_gate else (None, saved)
    if gate_up is not None:
        if saved is None:
            gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
            g, u = gu[:, :f], gu[:, f:]
        if b_gate:
            g += _rows(b_gate, expert)
        if b_up:
            u += _rows(b_up, expert)
        d_gu = xs.new_empty(rows, 2 * f)
        dg, du = d_gu[:, :f], d_gu[:, f:]
    else:  # each role stacked once (a copy for a list), read by its recompute and its dx GEMM
        up_s, gate_s = _stack(w_up), (_stack(w_gate) if w_gate else None)
        if saved is None:
            u = _linear(xs, up_s, b_up, offs, expert)
            g = _linear(xs, gate_s, b_gate, offs, expert) if w_gate else None
        dg, du = (xs.new_empty(rows, f) if w_gate else None), xs.new_empty(rows, f)
    g_dh = torch._grouped_mm(gs, _stack(w_down), offs=offs)  # grad @ w_down[e]: dh before the routing weight
    hr = xs.new_empty(rows, f)
    grad_route = expert_grads.grads(g, u, g_dh, route, activation, dg, du, hr)
    if b_down:
        grad_route = grad_route + (gs.float() * _rows(b_down, expert).float()).sum(-1)
    grad_down = torch._grouped_mm(gs.t(), hr, offs=offs)  # sum over rows of (grad * r)^T h
    grad_up = torch._grouped_mm(du.t(), xs, offs=offs)
    grad_gate = torch._grouped_mm(dg.t(), xs, offs=offs) if w_gate else x.new_empty(0)
    if gate_up is not None:
        dxs = torch._grouped_mm(d_gu, gate_up, offs=offs)
    else:
        dxs = torch._grouped_mm(du, up_s, offs=offs)
        if w_gate:
            dxs += torch._grouped_mm(dg, gate_s, offs=offs)
    grad_x = _combine(dxs, order, k)
    grad_weights = torch.empty(T * k, device=x.device, dtype=torch.float32).index_copy_(0, order, grad_route)

    def bias_grad(present, rows_grad):
        return x.new_zeros(E, rows_grad.shape[1]).index_add_(0, expert, rows_grad) if present else x.new_empty(0)
    dy = gs * route[:, None] if b_down else None
    return (grad_x, grad_weights.view(T, k).to(weights.dtype), grad_gate, grad_up, grad_down,
            bias_grad(b_gate, dg), bias_grad(b_up, du), bias_grad(b_down, dy))
