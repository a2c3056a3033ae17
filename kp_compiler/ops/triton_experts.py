"""Routed experts as two fused Triton kernels (the forward of ``kp::routed_experts``).

0. ``triton_routing.schedule``: the padded block schedule of the assignments
   by expert, one launch.
1. ``_gate_up``: per block of rows (one expert),
   gather the tokens' rows of ``x`` straight from their place (no permuted
   copy), multiply by the expert's gate and up weights sharing each loaded
   tile, apply ``act(gate) * up`` (or ``act(up)``) and store ``h``.
2. ``_down``: ``h @ w_down[e].T``, times each row's routing weight in fp32,
   stored at the row's assignment ``t * k + j`` of ``y [T*k, d]``; ``out`` is
   ``y.view(T, k, d).sum(1)`` (no atomics, deterministic).

The expert weights stay where the model keeps them: the kernels read them
through a device table of pointers (one per expert), so nothing is stacked
and training updates are seen by the next call. Every expert's weight must
have one shape and one row stride, contiguous along its last dim.

Tile sizes: the row block ``block_rows`` follows the mean rows per expert
(16 at decode size, 128 for large batches); the other tile sizes are picked
once per shape on the GPU by timing a few candidates (``_tuned``). Under
``TRITON_INTERPRET=1`` the first candidate runs (CPU tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .expert_addresses import (  # noqa: F401  (re-exported: callers read them here)
    Roles, _addresses, _experts, bias_tables, expert_tables, role_shape, roles, supported)
from .triton_launch import Launcher, cdiv, fastest
from .triton_routing import schedule, schedule_with_shifts

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 0:
        return z * tl.sigmoid(z)
    if ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if ACT == 2:  # tanh(u) = 2 * sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    return tl.maximum(z, 0.0)


@triton.jit
def _operand(t, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies 16-bit floats as raw integers in tl.dot; widening is exact
    # (products accumulate in fp32 on the GPU too), so CPU tests run the same kernel in bf16.
    if UPCAST:
        return t.to(tl.float32)
    return t


@triton.jit
def _bias_row(table, e, offs_n, N, like_ptr, HAS: tl.constexpr):
    """Expert ``e``'s bias over the columns ``offs_n`` in fp32 (zeros without a bias)."""
    if HAS:
        bias = tl.load(table + e).to(tl.pointer_type(like_ptr.dtype.element_ty))
        return tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    return tl.zeros(offs_n.shape, dtype=tl.float32)


@triton.jit
def _gate_up(x_ptr, rows_ptr, block_expert_ptr, gate_table, up_table, gate_bias_table, up_bias_table, h_ptr,
             saved_ptr, shifts_ptr, n_assign, n_experts, N, stride_x, stride_w, stride_h, stride_s,
             K: tl.constexpr, UPCAST: tl.constexpr, TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
             PRECISION: tl.constexpr, GATE_BIAS: tl.constexpr, UP_BIAS: tl.constexpr, SAVE: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = (N + BN - 1) // BN
    pid_m, pid_n = pid // n_tiles, pid % n_tiles  # n fastest: a block's gathered rows are reused from L2
    e = tl.load(block_expert_ptr + pid_m)
    if e >= n_experts:
        return
    rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM))
    valid = rows < n_assign
    tok = (tl.where(valid, rows, 0) // TOP_K).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    # A pointer read from memory has no known alignment, and Triton then loads the tile one element
    # at a time; `supported` checked that every expert weight is 16-byte aligned.
    w_up = tl.multiple_of(tl.load(up_table + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
    a_ptrs = x_ptr + tok[:, None] * stride_x + offs_k[None, :]
    u_ptrs = w_up + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if GATED:
        w_gate = tl.multiple_of(tl.load(gate_table + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
        g_ptrs = w_gate + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a = _operand(tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0), UPCAST)
        w_mask = k_ok[:, None] & (offs_n[None, :] < N)
        w_u = _operand(tl.load(u_ptrs, mask=w_mask, other=0.0), UPCAST)
        acc_u = tl.dot(a, w_u, acc_u, input_precision=PRECISION)
        if GATED:
            w_g = _operand(tl.load(g_ptrs, mask=w_mask, other=0.0), UPCAST)
            acc_g = tl.dot(a, w_g, acc_g, input_precision=PRECISION)
            g_ptrs += BK
        a_ptrs += BK
        u_ptrs += BK
    acc_u += _bias_row(up_bias_table, e, offs_n, N, x_ptr, UP_BIAS)[None, :]
    if GATED:
        acc_g += _bias_row(gate_bias_table, e, offs_n, N, x_ptr, GATE_BIAS)[None, :]
        h = _activation(acc_g, ACT) * acc_u
    else:
        h = _activation(acc_u, ACT)
    out_rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    h_ptrs = h_ptr + out_rows[:, None] * stride_h + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))
    if SAVE:  # the pre-activations at each assignment's row of the sort by expert ([gate | up], or up)
        s_rows = out_rows - tl.load(shifts_ptr + e).to(tl.int64)
        s_ptrs = saved_ptr + s_rows[:, None] * stride_s + offs_n[None, :]
        s_mask = valid[:, None] & (offs_n[None, :] < N)
        if GATED:
            tl.store(s_ptrs, acc_g.to(saved_ptr.dtype.element_ty), mask=s_mask)
            tl.store(s_ptrs + N, acc_u.to(saved_ptr.dtype.element_ty), mask=s_mask)
        else:
            tl.store(s_ptrs, acc_u.to(saved_ptr.dtype.element_ty), mask=s_mask)


@triton.jit
def _down(h_ptr, rows_ptr, block_expert_ptr, down_table, down_bias_table, route_ptr, y_ptr,
          n_assign, n_experts, N, stride_h, stride_w, stride_y,
          K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOWN_BIAS: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = (N + BN - 1) // BN
    pid_m, pid_n = pid // n_tiles, pid % n_tiles
    e = tl.load(block_expert_ptr + pid_m)
    if e >= n_experts:
        return
    rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM))
    valid = rows < n_assign
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_down = tl.multiple_of(tl.load(down_table + e).to(tl.pointer_type(h_ptr.dtype.element_ty)), 16)
    in_rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    a_ptrs = h_ptr + in_rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_down + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a = _operand(tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0), UPCAST)
        w = _operand(tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0), UPCAST)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BK
        w_ptrs += BK
    safe = tl.where(valid, rows, 0).to(tl.int64)
    route = tl.load(route_ptr + safe, mask=valid, other=0.0).to(tl.float32)
    acc = (acc + _bias_row(down_bias_table, e, offs_n, N, h_ptr, DOWN_BIAS)[None, :]) * route[:, None]
    y_ptrs = y_ptr + safe[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


_GATE_UP, _DOWN = Launcher(_gate_up), Launcher(_down)  # about 30 us less host time per launch


def _or(table, fallback):
    return fallback if table is None else table  # a kernel argument its constexpr flag leaves unread


def block_rows(assignments: int, experts: int) -> int:
    """Row block for the mean rows per expert: small blocks waste no work at decode size."""
    mean = assignments / experts
    for block, limit in ((16, 24), (32, 48), (64, 160)):
        if mean <= limit:
            return block
    return 128


# (BN, BK, num_warps, num_stages) candidates, timed once per shape on the GPU.
_CANDIDATES = {
    "gate_up": {16: [(64, 128, 4, 4), (32, 128, 4, 4), (128, 64, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4),
                     (32, 128, 2, 6)],
                "large": [(64, 64, 4, 4), (128, 64, 8, 3), (64, 64, 8, 4), (128, 32, 8, 4), (128, 64, 8, 4),
                          (64, 128, 4, 3), (128, 128, 8, 2)]},
    "down": {16: [(64, 128, 4, 4), (128, 128, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3), (16, 256, 4, 4),
                  (32, 128, 2, 6)],
             "large": [(128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4),
                       (256, 64, 8, 4), (128, 128, 8, 3)]},
}
# the backward's kernels (ops/triton_expert_backward.py): row-block GEMMs, and per-expert weight gradients
_CANDIDATES["rows_gemm"] = {16: [(64, 64, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3)],
                            "large": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3),
                                      (128, 128, 8, 3)]}
_CANDIDATES["wgrad"] = {16: [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
                        "large": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3),
                                  (128, 128, 8, 4)]}
_best: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(name: str, key: tuple, block: int, launch) -> None:
    """Run ``launch(config)`` with the fastest candidate for ``key`` (timed on first use on the GPU)."""
    candidates = _CANDIDATES[name][16 if block <= 16 else "large"]
    if key in _best or _interpreting():
        launch(_best.get(key, candidates[0]))
        return
    best = fastest(candidates, launch)
    if best is None:
        raise RuntimeError(f"no {name} tile candidate fits this GPU's shared memory and registers ({key})")
    _best[key] = best
    launch(best)


def forward(x, ids, weights, w_gate, w_up, w_down, activation: str, tables=None,
            biases=((), (), ()), bias_tabs=None, save: bool = False):
    """``kp::routed_experts`` (or ``_biased``) through the two kernels; ``tables`` from ``expert_tables``
    and ``bias_tabs`` from ``bias_tables`` (neither None: the caller checked); ``save`` as in ``run``."""
    return run(x, ids, weights, roles(w_gate, w_up, w_down), tables or expert_tables(x, w_gate, w_up, w_down),
               activation, bias_tabs or bias_tables(x, biases), save)


def run(x, ids, weights, shape: Roles, tables, activation: str, bias_tabs=(None, None, None), save: bool = False):
    """The kernels on the weights behind ``tables`` (``(gate, up, down)`` address tables, ``gate`` is ``up``
    for ungated experts), shaped as ``shape`` says. With ``save``, ``(output, saved)``: ``saved`` the gate and
    up pre-activations sorted by expert, as ``grouped_experts.forward(..., save=True)`` returns them."""
    gate, up, down = tables
    b_gate, b_up, b_down = bias_tabs
    T, d = x.shape
    k = ids.shape[1]
    E, f, up_stride, down_stride, gated = shape
    n = T * k
    block = block_rows(n, E)
    plan, shifts = schedule_with_shifts(ids, E, block) if save else (schedule(ids, E, block), None)
    rows_total = plan.rows.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = _interpreting() and x.dtype != torch.float32
    h = torch.empty(rows_total, f, device=x.device, dtype=x.dtype)
    saved = torch.empty(n, 2 * f if gated else f, device=x.device, dtype=x.dtype) if save else h

    def gate_up(config):
        bn, bk, warps, stages = config
        grid = (rows_total // block * cdiv(f, bn),)
        _GATE_UP(grid, x, plan.rows, plan.block_expert, gate, up, _or(b_gate, up), _or(b_up, up), h, saved,
                 plan.rows if shifts is None else shifts, n, E, f, x.stride(0), up_stride, h.stride(0), saved.stride(0),
                 K=d, UPCAST=upcast, TOP_K=k, GATED=gated, ACT=ACT_CODES[activation], PRECISION=precision,
                 GATE_BIAS=b_gate is not None, UP_BIAS=b_up is not None, SAVE=save,
                 BM=block, BN=bn, BK=bk, num_warps=warps, num_stages=stages)

    _tuned("gate_up", ("gate_up", block, d, f, gated, x.dtype, b_gate is not None, b_up is not None, save),
           block, gate_up)
    route = weights.reshape(-1).contiguous()
    y = torch.empty(n, d, device=x.device, dtype=x.dtype)

    def down_proj(config):
        bn, bk, warps, stages = config
        grid = (rows_total // block * cdiv(d, bn),)
        _DOWN(grid, h, plan.rows, plan.block_expert, down, _or(b_down, down), route, y, n, E, d,
                    h.stride(0), down_stride, y.stride(0),
                    K=f, UPCAST=upcast, PRECISION=precision, DOWN_BIAS=b_down is not None,
                    BM=block, BN=bn, BK=bk, num_warps=warps, num_stages=stages)

    _tuned("down", ("down", block, f, d, x.dtype, b_down is not None), block, down_proj)
    out = y.view(T, k, d).sum(1)
    return (out, saved) if save else out
