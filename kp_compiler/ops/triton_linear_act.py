"""Triton forward of ``kp::linear_act`` and ``kp::gated_linear`` (issue 19; ``lowering/linear_act.py`` decides where).

One kernel, ``_linear_act``: each program computes an ``[BM, BN]`` tile of
``x @ w_up.T`` and, for the gated form, of ``x @ w_gate.T`` in the same loop
over ``K`` (each tile of ``x`` loaded once for both), adds the biases in fp32,
applies ``act(gate) * up`` (or ``act(up)``) and stores the output; with
``store_pre`` it also stores the pre-activations the ``_train`` variants
return. The weights are read where the model keeps them (``[N, K]``, unit
stride along ``K``): gate and up are not packed into one tensor.

Programs walk the output in groups of ``GROUP_M`` row tiles, so a band of
weight tiles is reused from L2 by the row tiles beside it. Tile sizes are
timed once per shape on the GPU (``triton_experts._tuned``); under
``TRITON_INTERPRET=1`` the first candidate runs (CPU tests).

No shape chooses it yet: ``lowering/linear_act.py``'s table waits for a GPU
measurement against Inductor's own linear + pointwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_experts
from .triton_experts import ACT_CODES, _activation, _operand, _interpreting
from .triton_launch import cdiv

# (BM, BN, BK, num_warps, num_stages): few rows (decode) and many
triton_experts._CANDIDATES["linear_act"] = {
    16: [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4), (16, 32, 256, 4, 3)],
    "large": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
              (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)],
}


@triton.jit
def _linear_act(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr, g_ptr, u_ptr, M, N,
                stride_x, stride_wg, stride_wu, stride_o,
                K: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                PRECISION: tl.constexpr, GATE_BIAS: tl.constexpr, UP_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    u_ptrs = wu_ptr + offs_n[None, :].to(tl.int64) * stride_wu + offs_k[:, None]
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if GATED:
        g_ptrs = wg_ptr + offs_n[None, :].to(tl.int64) * stride_wg + offs_k[:, None]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a = _operand(tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0), UPCAST)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_u = tl.dot(a, _operand(tl.load(u_ptrs, mask=w_mask, other=0.0), UPCAST), acc_u,
                       input_precision=PRECISION)
        if GATED:
            acc_g = tl.dot(a, _operand(tl.load(g_ptrs, mask=w_mask, other=0.0), UPCAST), acc_g,
                           input_precision=PRECISION)
            g_ptrs += BK
        a_ptrs += BK
        u_ptrs += BK
    if UP_BIAS:
        acc_u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if GATE_BIAS:
            acc_g += tl.load(bg_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = _activation(acc_g, ACT) * acc_u
    else:
        out = _activation(acc_u, ACT)
    mask = m_ok[:, None] & n_ok[None, :]
    at = offs_m[:, None] * stride_o + offs_n[None, :]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_PRE:
        tl.store(u_ptr + at, acc_u.to(u_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(g_ptr + at, acc_g.to(g_ptr.dtype.element_ty), mask=mask)


def supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Floating ``x`` and weights of one dtype, weights ``[N, K]`` with unit stride along ``K``."""
    return (x.is_floating_point() and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and all(w.dtype == x.dtype and w.dim() == 2 and w.stride(1) == 1 for w in weights))


def forward(x: torch.Tensor, w_gate, w_up: torch.Tensor, b_gate, b_up, activation: str,
            store_pre: bool = False) -> tuple:
    """``(out, gate pre-activation or None, up pre-activation or None)``; ``w_gate`` None: ``act(x @ w_up.T + b)``
    (the pre-activation is then the third). Pre-activations only with ``store_pre``."""
    gated = w_gate is not None
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M, K = rows.shape
    N = w_up.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    g = torch.empty_like(out) if store_pre and gated else None
    u = torch.empty_like(out) if store_pre else None
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = _interpreting() and x.dtype != torch.float32

    def launch(config):
        bm, bn, bk, warps, stages = config
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        _linear_act[grid](rows, w_gate if gated else w_up, w_up, b_gate if b_gate is not None else w_up,
                          b_up if b_up is not None else w_up, out, g if g is not None else out,
                          u if u is not None else out, M, N, rows.stride(0),
                          (w_gate if gated else w_up).stride(0), w_up.stride(0), out.stride(0),
                          K=K, UPCAST=upcast, GATED=gated, ACT=ACT_CODES[activation], PRECISION=precision,
                          GATE_BIAS=b_gate is not None, UP_BIAS=b_up is not None, STORE_PRE=store_pre,
                          BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

    key = ("linear_act", 16 if M <= 16 else "large", K, N, gated, x.dtype, b_gate is not None,
           b_up is not None, store_pre)
    triton_experts._tuned("linear_act", key, 16 if M <= 16 else 64, launch)
    shape = (*x.shape[:-1], N)
    return out.view(shape), None if g is None else g.view(shape), None if u is None else u.view(shape)
