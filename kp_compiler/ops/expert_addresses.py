"""Where the routed-experts kernels find the expert weights: device tables of their addresses.

Also the checks that the kernels can read the weights in place. No Triton here (``ops/routed_experts_tables.py`` and the
lowering import it where Triton is absent); ``triton_experts`` re-exports these names.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.persistent import capturing, persistent, to_device
from .routed_experts import stacked

_experts: dict = {}
# Tables are never dropped: a captured CUDA graph reads them by address. Past this many (weights that keep
# moving), new ones are made per call instead of kept.
_KEEP = 4096
_data_ptr = torch.Tensor.data_ptr


def role_shape(ws) -> tuple:
    """``(experts, rows, cols, row stride)`` of a role: one weight per expert, or one 3-D ``[E, rows, cols]``
    tensor read in place (no per-expert views: 192 of them cost more host time than a decode step)."""
    w = ws[0]
    if stacked(ws):
        return w.shape[0], w.shape[1], w.shape[2], w.stride(1)
    return len(ws), w.shape[0], w.shape[1], w.stride(0)


def _addresses(ws) -> tuple:
    """Every expert weight's address: for a 3-D role, the base plus ``e`` times its expert stride."""
    if stacked(ws):
        w = ws[0]
        step = w.stride(0) * w.element_size()
        return tuple(w.data_ptr() + e * step for e in range(w.shape[0]))
    return tuple(map(_data_ptr, ws))  # map: no generator frame per weight


def expert_tables(x: torch.Tensor, w_gate, w_up, w_down):
    """``(gate, up, down)`` device tables of the expert weights' addresses (``gate`` is ``up`` for
    ungated experts), or None where the kernels cannot read the weights (``supported``).

    Cached by the weights' addresses (a 3-D role: its base address and expert stride) with the first
    weight's shape and strides per role: checking every weight costs more than a decode step's kernels
    (0.24 ms for 192 weights on a CPU core). Inside a compiled graph the weights' shapes and strides are
    fixed by Dynamo's guards.
    """
    roles = (w_gate, w_up, w_down)
    key = (x.device, x.dtype,
           *((ws[0].data_ptr(), tuple(ws[0].shape), ws[0].stride()) if stacked(ws)
             else (tuple(map(_data_ptr, ws)), tuple(ws[0].shape), ws[0].stride()) if ws else () for ws in roles))
    if key in _experts:
        return _experts[key]
    tables = None
    if supported(x, w_gate, w_up, w_down):
        def make():
            up, down = (to_device(torch.tensor(_addresses(ws), dtype=torch.int64), x.device) for ws in roles[1:])
            return (to_device(torch.tensor(_addresses(w_gate), dtype=torch.int64), x.device) if w_gate else up,
                    up, down)
        if capturing() or len(_experts) >= _KEEP:  # the graph's own copy, in its pool: not kept (core/persistent.py)
            return make()
        tables = persistent(make)
    _experts[key] = tables
    return tables


def bias_tables(x: torch.Tensor, biases):
    """Per role (gate, up, down), a device table of the expert biases' addresses or None for a role
    without bias; None overall where the kernels cannot read them (1-D, unit stride, ``x``'s dtype)."""
    tables = []
    for bs in biases:
        if not bs:
            tables.append(None)
            continue
        key = ("bias", x.device, x.dtype, tuple(b.data_ptr() for b in bs))
        table = _experts.get(key)
        if key not in _experts:
            ok = all(b.dim() == 1 and b.stride(0) == 1 and b.dtype == x.dtype and b.device == x.device for b in bs)
            make = lambda: to_device(torch.tensor(key[3], dtype=torch.int64), x.device)  # noqa: E731
            keep = not capturing() and len(_experts) < _KEEP
            table = None if not ok else persistent(make) if keep else make()
            if keep:
                _experts[key] = table
        if table is None:
            return None
        tables.append(table)
    return tuple(tables)


def supported(x: torch.Tensor, w_gate, w_up, w_down) -> bool:
    """Every expert weight of a role has one shape and row stride, unit stride along its last dim,
    and starts and keeps its rows 16-byte aligned (the kernels tell Triton so); gate and up share one row
    stride (``_gate_up`` reads both with it)."""
    if w_gate and role_shape(w_gate)[3] != role_shape(w_up)[3]:
        return False
    for ws in (w_gate, w_up, w_down):
        if not ws:
            continue
        if stacked(ws):
            w = ws[0]
            if (w.stride(-1) != 1 or w.dtype != x.dtype or w.device != x.device or w.data_ptr() % 16
                    or (w.stride(1) * w.element_size()) % 16 or (w.stride(0) * w.element_size()) % 16):
                return False
            continue
        if any(w.shape != ws[0].shape or w.stride() != ws[0].stride() or w.stride(-1) != 1
               or w.dtype != x.dtype or w.device != x.device or w.data_ptr() % 16
               or (w.stride(0) * w.element_size()) % 16 for w in ws):
            return False
    return x.stride(-1) == 1


class Roles(NamedTuple):
    """What the kernels read of the expert weights besides their addresses."""

    experts: int
    f: int  # the hidden size (rows of a gate/up weight)
    up_stride: int  # row stride of a gate/up weight (gate and up share it: ``supported``)
    down_stride: int
    gated: bool


def roles(w_gate, w_up, w_down) -> Roles:
    E, f, _, up_stride = role_shape(w_up)
    return Roles(E, f, up_stride, role_shape(w_down)[3], bool(w_gate))
