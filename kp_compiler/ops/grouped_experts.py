"""Routed experts through ``torch._grouped_mm``: tokens sorted by expert, three grouped GEMMs.

The same math as ``routed_experts.reference`` (``kp::routed_experts``), for
devices and dtypes where ``torch._grouped_mm`` runs (CUDA 9.0 in bf16; the
CPU in torch 2.13 for tests). Inner dims must keep 16-byte aligned strides.
The expert weights are stacked per call (a copy of all expert weights:
measure before choosing this path); ``lowering/moe.py`` decides where.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .routed_experts import ACTIVATIONS


def aligned(x: torch.Tensor, w_up: Sequence[torch.Tensor]) -> bool:
    """Row strides of every operand are 16-byte multiples (``_grouped_mm``'s requirement)."""
    f, d = w_up[0].shape
    return (d * x.element_size()) % 16 == 0 and (f * x.element_size()) % 16 == 0


def _sort_by_expert(ids: torch.Tensor, experts: int):
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return order, offs


def forward(x, ids, weights, w_gate, w_up, w_down, activation: str) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    k = ids.shape[1]
    order, offs = _sort_by_expert(ids, len(w_up))
    tokens = order // k
    xs = x[tokens]
    up = torch._grouped_mm(xs, torch.stack(list(w_up)).transpose(1, 2), offs=offs)
    if w_gate:
        h = act(torch._grouped_mm(xs, torch.stack(list(w_gate)).transpose(1, 2), offs=offs)) * up
    else:
        h = act(up)
    y = torch._grouped_mm(h, torch.stack(list(w_down)).transpose(1, 2), offs=offs)
    y = y * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add(0, tokens, y)
