"""``fp8_gated_quant``'s casts as Triton kernels: the gated activation (or its gradients) computed twice, never stored.

``gated_pair(g, u, activation, dtype)`` and ``gated_grad_pairs(dh, g, u,
activation, dtype)`` are two launches each (and the zero fill of the amax
buffer), with no host sync:

1. ``_gated_amax``: each program computes ``h = act(g) * u`` (backward:
   ``dg = dh * u * act'(g)`` and ``du = dh * act(g)``) in fp32 over a
   ``[BLOCK_R, BLOCK_C * TILES]`` part and ``tl.atomic_max``-es the largest
   finite ``|h|`` (``|dg|``, ``|du|``) into an fp32 buffer of zeros.
2. ``_gated_quantize``: recomputes the same values from the same inputs,
   divides by ``scale = amax / fp8_max`` (1 where amax is 0; stored by
   program ``(0, 0)``), saturates, casts, and stores each result row-major
   ``[M, F]`` and transposed ``[F, Mp]``, the padding columns zero. The
   transposed tile is computed from a transposed load of the same inputs
   (an L2 read), not by ``tl.trans``, whose store wrote wrong bytes on the
   H200.

Against casting a stored bf16 ``h``: ``g`` and ``u`` are read twice, but
``h`` is neither written nor read back twice (forward: 1.4 -> 1.2 bytes
moved per ``h`` element in 16-bit units; backward, where ``dg`` and ``du``
were written, read for their amax and read for their casts: 2.6 -> 1.9; the
transposed tile's second read is not counted, it comes from L2). On the H200
that did not make it faster than the separate casts (``docs/passes/fp8.md``).
``g``, ``u`` and ``dh`` must be contiguous ``[M, F]`` of one 16- or 32-bit
float dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gated_quant import check_activation
from .fp8_quant import padded
from .triton_fp8 import EXACT_ROUND, FP32_MAX, _constants, _round_to_grid
from .triton_launch import Launcher, cdiv

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
CONFIG = {"amax": dict(BLOCK_R=32, BLOCK_C=128, TILES=4, num_warps=8),
          "quantize": dict(BLOCK_R=64, BLOCK_C=64, num_warps=8)}


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """``(act(z), act'(z))`` in fp32: silu (0), gelu (1), gelu with tanh (2)."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 0.134145 * z * z)


@triton.jit
def _values(g_ptr, u_ptr, d_ptr, offs, mask, ACT: tl.constexpr, BACKWARD: tl.constexpr):
    """``(h, h)`` forward, ``(dg, du)`` backward, fp32, 0 outside ``mask``."""
    z = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(z, ACT)
    if BACKWARD:
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return d * u * da, d * a
    h = a * u
    return h, h


@triton.jit
def _finite_abs(v):
    a = tl.abs(v)
    return tl.where(a <= FP32_MAX, a, 0.0)  # inf and NaN fail the comparison: left out, as fp8_quant.amax


@triton.jit
def _gated_amax(g_ptr, u_ptr, d_ptr, out_ptr, R, C, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C * TILES
    best_a = tl.zeros((BLOCK_R,), dtype=tl.float32)
    best_b = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(TILES):
        cols = col0 + i * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        offs = rows.to(tl.int64)[:, None] * C + cols.to(tl.int64)[None, :]
        a, b = _values(g_ptr, u_ptr, d_ptr, offs, mask, ACT, BACKWARD)
        best_a = tl.maximum(best_a, tl.max(_finite_abs(a), axis=1))
        if BACKWARD:
            best_b = tl.maximum(best_b, tl.max(_finite_abs(b), axis=1))
    tl.atomic_max(out_ptr, tl.max(best_a, axis=0))
    if BACKWARD:
        tl.atomic_max(out_ptr + 1, tl.max(best_b, axis=0))


@triton.jit
def _saturated(t, s, TOP: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr, EXACT: tl.constexpr):
    """``saturate(t / s)`` in fp32, on the FP8 grid where ``EXACT``."""
    y = tl.clamp(tl.math.div_rn(t, tl.full(t.shape, 1.0, tl.float32) * s), -TOP, TOP,
                 propagate_nan=tl.PropagateNan.ALL)
    if EXACT:  # rounded in fp32 first, so the cast is exact: the interpreter's FP8 cast rounds wrongly
        y = _round_to_grid(y, MANT, EMIN)
    return y


@triton.jit
def _cast(v, vt, s, q_ptr, qt_ptr, rows, cols, R, RP, C, TOP: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
          EXACT: tl.constexpr):
    """``v`` into ``q [R, C]``, and ``vt`` (the same values computed from a transposed load) into ``qt [C, RP]``
    (rows ``R..RP`` are zeros).

    Not ``tl.trans``: on the H200 (Triton 3.6) a transposed store from ``tl.trans`` of the tile, before or after
    the FP8 cast, wrote wrong bytes here (18 of 29 kernel tests failed; both ran 3% faster than this), as it did in
    ``triton_fp8`` for fp32 inputs (bench/results/2026-12-02-h200-fp8-gated-*).
    """
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    y = _saturated(v, s, TOP, MANT, EMIN, EXACT)
    tl.store(q_ptr + rows64[:, None] * C + cols64[None, :], y.to(q_ptr.dtype.element_ty),
             mask=(rows[:, None] < R) & (cols[None, :] < C))
    yt = _saturated(vt, s, TOP, MANT, EMIN, EXACT)
    tl.store(qt_ptr + cols64[:, None] * RP + rows64[None, :], yt.to(qt_ptr.dtype.element_ty),
             mask=(cols[:, None] < C) & (rows[None, :] < RP))


@triton.jit
def _scale(amax_ptr, scale_ptr, i: tl.constexpr, first, TOP: tl.constexpr, INV_TOP: tl.constexpr,
           RECIPROCAL: tl.constexpr):
    """``amax[i] / fp8_max`` (1 where amax is 0), as ``triton_fp8._quantize`` computes it; stored where ``first``."""
    m = tl.load(amax_ptr + i)
    if RECIPROCAL:
        s = tl.where(m > 0, m * INV_TOP, 1.0)
    else:
        s = tl.where(m > 0, tl.math.div_rn(m, TOP), 1.0)
    # a tensor, not a scalar, stored: Triton's interpreter takes no scalar-by-tensor mask
    tl.store(scale_ptr + tl.zeros_like(first.to(tl.int32)), tl.zeros_like(first.to(tl.float32)) + s, mask=first)
    return s


@triton.jit
def _gated_quantize(g_ptr, u_ptr, d_ptr, amax_ptr, sa_ptr, sb_ptr, qa_ptr, qat_ptr, qb_ptr, qbt_ptr, R, RP, C,
                    TOP: tl.constexpr, INV_TOP: tl.constexpr, RECIPROCAL: tl.constexpr, MANT: tl.constexpr,
                    EMIN: tl.constexpr, EXACT_ROUND: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # a tensor, not a scalar: Triton's interpreter takes no scalar-by-tensor mask
    first = ((tl.zeros_like(rows) + tl.program_id(0) + tl.program_id(1)) == 0) & (tl.arange(0, BLOCK_R) == 0)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    a, b = _values(g_ptr, u_ptr, d_ptr, rows64[:, None] * C + cols64[None, :],
                   (rows[:, None] < R) & (cols[None, :] < C), ACT, BACKWARD)
    at, bt = _values(g_ptr, u_ptr, d_ptr, rows64[None, :] * C + cols64[:, None],
                     (rows[None, :] < R) & (cols[:, None] < C), ACT, BACKWARD)
    sa = _scale(amax_ptr, sa_ptr, 0, first, TOP, INV_TOP, RECIPROCAL)
    _cast(a, at, sa, qa_ptr, qat_ptr, rows, cols, R, RP, C, TOP, MANT, EMIN, EXACT_ROUND)
    if BACKWARD:
        sb = _scale(amax_ptr, sb_ptr, 1, first, TOP, INV_TOP, RECIPROCAL)
        _cast(b, bt, sb, qb_ptr, qbt_ptr, rows, cols, R, RP, C, TOP, MANT, EMIN, EXACT_ROUND)


_AMAX, _QUANTIZE = Launcher(_gated_amax), Launcher(_gated_quantize)


def _run(d, g, u, activation: str, dtype: torch.dtype):
    check_activation(activation)
    for t in (g, u) + ((d,) if d is not None else ()):
        if t.dim() != 2 or t.shape != g.shape or not t.is_contiguous() or t.dtype != g.dtype:
            raise ValueError(f"triton_fp8_gated: expected contiguous 2-D tensors of one shape and dtype, got "
                             f"{tuple(t.shape)} {t.dtype} (contiguous: {t.is_contiguous()}) beside "
                             f"{tuple(g.shape)} {g.dtype}")
    backward = d is not None
    rows, cols = g.shape
    rp = padded(rows)
    n = 2 if backward else 1
    m = torch.zeros(n, dtype=torch.float32, device=g.device)
    # one tensor per scale: torch._scaled_mm's cuBLASLt call refused a scale at a 4-byte offset (H200)
    scales = [torch.empty((), dtype=torch.float32, device=g.device) for _ in range(n)]
    outs = []
    for _ in range(n):
        outs += [torch.empty(rows, cols, dtype=dtype, device=g.device),
                 torch.empty(cols, rp, dtype=dtype, device=g.device)]
    if n == 1:
        outs += outs  # unused second pair: any valid pointers
    d = d if backward else g
    act = ACT_CODES[activation]
    if rows and cols:
        cfg = CONFIG["amax"]
        _AMAX((cdiv(rows, cfg["BLOCK_R"]), cdiv(cols, cfg["BLOCK_C"] * cfg["TILES"])), g, u, d, m, rows, cols,
              ACT=act, BACKWARD=backward, **cfg)
    cfg = CONFIG["quantize"]
    if not (rows and cols):
        for s in scales:
            s.fill_(1.0)  # no values: any scale represents them (fp8_quant.scale_from_amax gives 1)
    if rp and cols:
        _QUANTIZE((cdiv(rp, cfg["BLOCK_R"]), cdiv(cols, cfg["BLOCK_C"])), g, u, d, m, scales[0], scales[-1], *outs,
                  rows, rp, cols,
                  RECIPROCAL=g.is_cuda, EXACT_ROUND=EXACT_ROUND or not g.is_cuda, ACT=act, BACKWARD=backward,
                  **_constants(dtype), **cfg)
    return outs, scales


def gated_pair(g: torch.Tensor, u: torch.Tensor, activation: str, dtype: torch.dtype):
    """``fp8_gated_quant.gated_pair``: ``(q(h), q(h).T, sh)``."""
    (q, qt, *_), s = _run(None, g, u, activation, dtype)
    return q, qt, s[0]


def gated_grad_pairs(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, dtype: torch.dtype):
    """``fp8_gated_quant.gated_grad_pairs``: ``(q(dg), q(dg).T, sdg, q(du), q(du).T, sdu)``."""
    (qg, qgt, qu, qut), s = _run(dh, g, u, activation, dtype)
    return qg, qgt, s[0], qu, qut, s[1]
