"""``kp::routed_experts_backward`` in Triton: the weights read where the model keeps them, no stacked copies.

The grouped-GEMM backward (``grouped_experts.backward``) needs each role as one
3-D tensor, so experts kept as separate parameters (an ``nn.ModuleList``) are
stacked, a copy of every expert weight, on every call, and it issues about
forty launches. This backward reads the weights through the forward's device
tables of addresses (``triton_experts.expert_tables``) and works on the
forward's padded schedule (``triton_routing``: rows sorted by expert, each
expert's run padded to the row block, padding rows index ``T*k``):

1. ``_rows_gemm`` three times: ``g`` and ``u`` recomputed from the tokens' rows
   of ``x`` (gathered in place), and ``g_dh = grad_rows @ w_down[e]``;
2. ``expert_grads.grads``: ``dg``, ``du``, ``h * r`` and the routing weights'
   gradient in one pass;
3. ``_rows_gemm`` once more: ``dx_rows = [dg | du] @ [w_gate[e]; w_up[e]]``,
   stored at each row's assignment ``t*k + j``; ``grad_x`` is the sum over ``k``;
4. ``_wgrad`` per role: ``grad_w[e] = A_e^T @ B_e`` over expert ``e``'s rows
   (``dg^T x``, ``du^T x``, ``grad^T (h * r)``); an expert with no rows gets zeros.

About ten launches in all, deterministic (no atomics). Expert biases add a
few ATen ops (their rows added after the recompute, the down bias's share of
the routing weights' gradient) and one ``_wgrad`` per bias (a sum over the
expert's rows, against a column of ones or of routing weights). Tile sizes are timed once per shape on the GPU, among
``triton_experts._CANDIDATES['rows_gemm' | 'wgrad']``, as the forward's are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import expert_grads
from .triton_experts import _interpreting, _operand, _tuned, block_rows, role_shape
from .triton_launch import Launcher, cdiv
from .triton_routing import schedule_with_ends


@triton.jit
def _weight(table, e, like_ptr):
    return tl.multiple_of(tl.load(table + e).to(tl.pointer_type(like_ptr.dtype.element_ty)), 16)


@triton.jit
def _rows_gemm(a_ptr, rows_ptr, block_expert_ptr, w1_table, w2_table, out_ptr,
               n_assign, n_experts, N, stride_a, stride_wn, stride_wk, stride_out,
               K1: tl.constexpr, K2: tl.constexpr, TOP_K: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, TWO: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``out[row] = A[row] @ W_e`` for each padded row of one expert's block, ``W_e[k, n]`` at
    ``w + n * stride_wn + k * stride_wk`` (the second table continues ``k`` past ``K1``). ``A``'s row is the
    token's (``GATHER``) or the schedule position's; ``out``'s row the assignment's (``SCATTER``) or the
    schedule position's."""
    pid = tl.program_id(0)
    n_tiles = (N + BN - 1) // BN
    pid_m, pid_n = pid // n_tiles, pid % n_tiles
    e = tl.load(block_expert_ptr + pid_m)
    if e >= n_experts:
        return
    at = pid_m * BM + tl.arange(0, BM)
    rows = tl.load(rows_ptr + at)
    valid = rows < n_assign
    if GATHER:
        src = (tl.where(valid, rows, 0) // TOP_K).to(tl.int64)
    else:
        src = at.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w = _weight(w1_table, e, a_ptr)
    for k0 in range(0, K1, BK):
        k_ok = offs_k < K1 - k0
        a = _operand(tl.load(a_ptr + src[:, None] * stride_a + (k0 + offs_k)[None, :],
                             mask=valid[:, None] & k_ok[None, :], other=0.0), UPCAST)
        wt = _operand(tl.load(w + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None].to(tl.int64) * stride_wk,
                              mask=k_ok[:, None] & n_ok[None, :], other=0.0), UPCAST)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if TWO:
        w2 = _weight(w2_table, e, a_ptr)
        for k0 in range(0, K2, BK):
            k_ok = offs_k < K2 - k0
            a = _operand(tl.load(a_ptr + src[:, None] * stride_a + (K1 + k0 + offs_k)[None, :],
                                 mask=valid[:, None] & k_ok[None, :], other=0.0), UPCAST)
            wt = _operand(tl.load(w2 + offs_n[None, :].to(tl.int64) * stride_wn
                                  + (k0 + offs_k)[:, None].to(tl.int64) * stride_wk,
                                  mask=k_ok[:, None] & n_ok[None, :], other=0.0), UPCAST)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if SCATTER:
        dst = tl.where(valid, rows, 0).to(tl.int64)
    else:
        dst = at.to(tl.int64)
    tl.store(out_ptr + dst[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_rows(acc, r0, a_ptr, b_ptr, rows_ptr, n_assign, offs_n, offs_k, n_ok, k_ok, stride_a, stride_b,
                TOP_K: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BM: tl.constexpr):
    """``acc += A[rows]^T @ B[rows]`` for the ``BM`` schedule rows from ``r0``."""
    at = r0 + tl.arange(0, BM)
    rows = tl.load(rows_ptr + at)
    valid = rows < n_assign
    token = (tl.where(valid, rows, 0) // TOP_K).to(tl.int64)
    src_a = token if GATHER_A else at.to(tl.int64)
    src_b = token if GATHER_B else at.to(tl.int64)
    a = _operand(tl.load(a_ptr + src_a[None, :] * stride_a + offs_n[:, None], mask=valid[None, :] & n_ok[:, None],
                         other=0.0), UPCAST)
    b = _operand(tl.load(b_ptr + src_b[:, None] * stride_b + offs_k[None, :], mask=valid[:, None] & k_ok[None, :],
                         other=0.0), UPCAST)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _wgrad(a_ptr, b_ptr, rows_ptr, ends_ptr, out_ptr, n_assign, N, K, stride_a, stride_b, stride_oe, stride_on,
           TOP_K: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, UPCAST: tl.constexpr,
           PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WHILE: tl.constexpr):
    """``out[e][n, k] = sum over expert e's rows r of A[r, n] * B[r, k]`` (``A``/``B`` rows gathered by token or
    in schedule order); expert ``e`` is program axis 1, its rows ``[ends[e - 1], ends[e])``. ``WHILE``: walk
    them with a while loop (Triton 3.5's interpreter takes no loaded value as a ``range`` bound; a ``for``
    loop is the one the compiler pipelines)."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    k_tiles = (K + BK - 1) // BK
    pid_n, pid_k = pid // k_tiles, pid % k_tiles
    end = tl.load(ends_ptr + e)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    n_ok, k_ok = offs_n < N, offs_k < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    if WHILE:
        r0 = start
        while r0 < end:
            acc = _wgrad_rows(acc, r0, a_ptr, b_ptr, rows_ptr, n_assign, offs_n, offs_k, n_ok, k_ok, stride_a,
                              stride_b, TOP_K, GATHER_A, GATHER_B, UPCAST, PRECISION, BM)
            r0 += BM
    else:
        for r0 in range(start, end, BM):
            acc = _wgrad_rows(acc, r0, a_ptr, b_ptr, rows_ptr, n_assign, offs_n, offs_k, n_ok, k_ok, stride_a,
                              stride_b, TOP_K, GATHER_A, GATHER_B, UPCAST, PRECISION, BM)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


_ROWS_GEMM, _WGRAD = Launcher(_rows_gemm), Launcher(_wgrad)


def backward(grad, x, ids, weights, w_gate, w_up, w_down, activation: str, tables, biases=((), (), ())):
    """``(grad_x, grad_weights, grad_gate [E, f, d] or empty, grad_up, grad_down [E, d, f], grad_b_gate [E, f],
    grad_b_up, grad_b_down [E, d])``, as ``routed_experts.reference_backward`` (a role without bias gets an
    empty gradient). ``tables``: the forward's ``expert_tables``; ``biases``: per-expert lists, or empty."""
    gate_t, up_t, down_t = tables
    T, k = ids.shape
    E, f, d, up_stride = role_shape(w_up)
    down_stride = role_shape(w_down)[3]
    gated = bool(w_gate)
    n = T * k
    block = block_rows(n, E)
    plan, ends = schedule_with_ends(ids.contiguous(), E, block)
    rows_total = plan.rows.numel()
    grad = grad.contiguous()
    precision = "ieee" if x.dtype == torch.float32 or _interpreting() else "tf32"
    common = dict(UPCAST=_interpreting() and x.dtype != torch.float32, PRECISION=precision, BM=block)

    def rows_gemm(a, w1, w2, out, N, K1, K2, stride_wn, stride_wk, gather, scatter):
        def launch(config):
            bn, bk, warps, stages = config
            grid = (rows_total // block * cdiv(N, bn),)
            _ROWS_GEMM(grid, a, plan.rows, plan.block_expert, w1, w2, out, n, E, N, a.stride(0),
                       stride_wn, stride_wk, out.stride(0), K1=K1, K2=K2, TOP_K=k, GATHER=gather, SCATTER=scatter,
                       TWO=w2 is not w1, **common, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
        _tuned("rows_gemm", ("rows_gemm", block, N, K1, K2, stride_wk == 1, gather, scatter, x.dtype), block, launch)

    def wgrad(a, b, out, gather_a, gather_b):
        N, K = out.shape[1:]

        def launch(config):
            bn, bk, warps, stages = config
            grid = (cdiv(N, bn) * cdiv(K, bk), E)
            _WGRAD(grid, a, b, plan.rows, ends, out, n, N, K, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
                   TOP_K=k, GATHER_A=gather_a, GATHER_B=gather_b, **common, BN=bn, BK=bk, WHILE=_interpreting(),
                   num_warps=warps, num_stages=stages)
        _tuned("wgrad", ("wgrad", block, N, K, gather_a, gather_b, x.dtype), block, launch)

    width = 2 * f if gated else f
    gu = x.new_empty(rows_total, width)  # [g | u] per schedule row
    g, u = (gu[:, :f], gu[:, f:]) if gated else (None, gu)
    b_gate, b_up, b_down = biases
    expert = None
    if any(biases):  # each schedule row's expert (E for padding: a zero bias row)
        expert = plan.block_expert.repeat_interleave(block).long()
    if gated:
        rows_gemm(x, gate_t, gate_t, g, f, d, 0, up_stride, 1, True, False)
        if b_gate:
            g += _rows(b_gate, expert)
    rows_gemm(x, up_t, up_t, u, f, d, 0, up_stride, 1, True, False)
    if b_up:
        u += _rows(b_up, expert)
    g_dh = x.new_empty(rows_total, f)
    rows_gemm(grad, down_t, down_t, g_dh, f, d, 0, 1, down_stride, True, False)  # grad_rows @ w_down[e]
    route = torch.cat([weights.reshape(-1), weights.new_zeros(1)])[plan.rows]  # padding rows: weight 0
    d_gu, hr = x.new_empty(rows_total, width), x.new_empty(rows_total, f)
    dg, du = (d_gu[:, :f], d_gu[:, f:]) if gated else (None, d_gu)
    dr = expert_grads.grads(g, u, g_dh, route, activation, dg, du, hr)
    if b_down:  # the routing weight also scales the down bias: + grad_row . b_down[e]
        token = (plan.rows.long() // k).clamp(max=T - 1)
        dr = dr + (grad[token].float() * _rows(b_down, expert).float()).sum(-1)
    grad_weights = torch.zeros(n + 1, device=x.device, dtype=torch.float32).index_copy_(0, plan.rows.long(), dr)
    dx_rows = x.new_empty(n, d)
    if gated:  # [dg | du] @ [w_gate[e]; w_up[e]]
        rows_gemm(d_gu, gate_t, up_t, dx_rows, d, f, f, 1, up_stride, False, True)
    else:
        rows_gemm(d_gu, up_t, up_t, dx_rows, d, f, 0, 1, up_stride, False, True)
    grad_up = x.new_empty(E, f, d)
    wgrad(du, x, grad_up, False, True)
    grad_gate = x.new_empty(0)
    if gated:
        grad_gate = x.new_empty(E, f, d)
        wgrad(dg, x, grad_gate, False, True)
    grad_down = x.new_empty(E, d, f)
    wgrad(grad, hr, grad_down, True, False)

    def bias_grad(present, a, b, gather_a):
        """Per expert, the sum over its rows of ``a * b`` (``b`` one column): a bias's gradient."""
        if not present:
            return x.new_empty(0)
        out = x.new_empty(E, a.shape[1], 1)
        wgrad(a, b, out, gather_a, False)
        return out.view(E, -1)
    ones = x.new_ones(rows_total, 1) if (b_gate or b_up) else None
    return (dx_rows.view(T, k, d).sum(1), grad_weights[:n].view(T, k).to(weights.dtype), grad_gate, grad_up,
            grad_down, bias_grad(b_gate, dg, ones, False), bias_grad(b_up, du, ones, False),
            bias_grad(b_down, grad, route.to(grad.dtype).view(-1, 1), True))  # tl.dot takes one dtype


def _rows(bs, expert) -> torch.Tensor:
    """Each schedule row's expert bias (``expert == E``, a padding row: zeros)."""
    stacked = torch.stack(list(bs))
    return torch.cat([stacked, stacked.new_zeros(1, stacked.shape[1])])[expert]
