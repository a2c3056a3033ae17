"""``fp8_quant``'s amax and saturating casts as two Triton kernels (the casts of the CUDA FP8 path).

``quantize_dynamic(t, dtype, rowwise)`` is two launches (and the zero fill of
the amax buffer), with no host sync:

1. ``_amax``: each program takes a ``[BLOCK_R, BLOCK_C * TILES]`` part of the
   2-D input (any strides: the backward quantizes transposed views), the
   largest finite ``|t|`` of each of its rows (non-finite values count as 0,
   as in ``fp8_quant.amax``), and ``tl.atomic_max``-es it into an fp32
   buffer of zeros: one entry per row (rowwise), or one in all
   (tensorwise). Every value is ``>= 0`` and max does not depend on the
   order, so the result is exact and deterministic.
2. ``_quantize``: ``scale = amax / fp8_max`` (1 where amax is 0), stored by
   the programs of the first column block, then ``clamp(t / scale, -max,
   max)`` in fp32, rounded to nearest even into ``dtype`` (the GPU's
   conversion; under the interpreter, rounded in fp32 arithmetic first:
   ``EXACT_ROUND``) and stored contiguous (``[rows, cols]`` of the view it
   was given, row-major: what ``fp8_cuda.scaled_mm`` takes for both
   operands). With ``TRANSPOSED`` it also stores the same bytes as
   ``[cols, rows]``: ``quantize_pair``, the training ops' cast.

``dequantize(q, scale, out)`` is the way back, ``q * scale`` in fp32 rounded once into ``out``'s dtype: the
FP8 all-gather's arrival (``ops/fp8_all_gather.py``).

``quantize(t, scale, dtype)`` is step 2 with a given scale read from device
memory (0-dim, or ``[rows, 1]``). ``t / scale`` is IEEE round-to-nearest
(``div_rn``), as in PyTorch. ``amax / fp8_max`` follows PyTorch on the
tensor's device: CUDA PyTorch multiplies by the fp32 reciprocal of a Python
divisor (which can be one ulp off the quotient: seen on an H100 for rowwise
scales), the CPU divides. So on the same input the scale and the bytes equal
``fp8_quant``'s on the same device (``tests/ops/test_triton_fp8.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fp8_quant import fp8_max, padded
from .triton_launch import Launcher, cdiv

FP32_MAX = tl.constexpr(3.4028234663852886e38)
# Tiles and warps of each kernel (square tiles: a transposed view reads as well as a row-major one);
# scripts/gpu_fp8_cast_tune.py times the alternatives on the GPU.
CONFIG = {"amax": dict(BLOCK_R=32, BLOCK_C=128, TILES=4, num_warps=8),
          "quantize": dict(BLOCK_R=64, BLOCK_C=64, num_warps=4),
          "quantize_pair": dict(BLOCK_R=64, BLOCK_C=64, num_warps=8)}
# On CUDA the final cast is the hardware's round-to-nearest-even conversion (the same bytes as PyTorch's
# cast: tests/ops/test_triton_fp8.py passed on the H100; 15% faster than rounding in fp32 first); True
# rounds in fp32 arithmetic first, as the interpreter always does (its FP8 cast rounds wrongly).
EXACT_ROUND = False
FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, smallest normal exponent


@triton.jit
def _amax(x_ptr, out_ptr, R, C, stride_r, stride_c,
          ROWWISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C * TILES
    row_offs = rows.to(tl.int64)[:, None] * stride_r
    best = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(TILES):
        cols = col0 + i * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        a = tl.abs(tl.load(x_ptr + row_offs + cols.to(tl.int64)[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32))
        a = tl.where(a <= FP32_MAX, a, 0.0)  # inf and NaN fail the comparison: left out
        best = tl.maximum(best, tl.max(a, axis=1))
    if ROWWISE:
        tl.atomic_max(out_ptr + rows, best, mask=rows < R)
    else:
        tl.atomic_max(out_ptr, tl.max(best, axis=0))


@triton.jit
def _round_to_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """``y`` (fp32) rounded to nearest even onto the FP8 format's values (``MANT`` mantissa bits, ``EMIN``)."""
    a = tl.abs(y)
    sign = y.to(tl.int32, bitcast=True) ^ a.to(tl.int32, bitcast=True)
    exp = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN) - MANT  # log2 of a's FP8 ulp
    ulp = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - exp) << 23).to(tl.float32, bitcast=True)
    # a / ulp < 2**(MANT + 1) is rounded to an integer, half to even, by fp32 addition's rounding
    r = ((a * inv_ulp + 12582912.0) - 12582912.0) * ulp
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x_ptr, scale_ptr, amax_ptr, q_ptr, qt_ptr, R, C, stride_r, stride_c,
              TOP: tl.constexpr, INV_TOP: tl.constexpr, RECIPROCAL: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr, ROWWISE: tl.constexpr, FROM_AMAX: tl.constexpr, TRANSPOSED: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = rows < R
    which = rows if ROWWISE else tl.zeros_like(rows)  # the scale of each row
    if FROM_AMAX:
        m = tl.load(amax_ptr + which, mask=in_rows, other=0.0)
        if RECIPROCAL:
            s = tl.where(m > 0, m * INV_TOP, 1.0)
        else:
            s = tl.where(m > 0, tl.math.div_rn(m, tl.full(m.shape, TOP, tl.float32)), 1.0)
        # a tensor, not a scalar: Triton 3.9's interpreter takes no scalar-by-tensor mask
        first = (tl.zeros_like(rows) + tl.program_id(1)) == 0
        if not ROWWISE:
            first = first & ((tl.zeros_like(rows) + tl.program_id(0)) == 0)
        tl.store(scale_ptr + which, s, mask=in_rows & first)
    else:
        s = tl.load(scale_ptr + which, mask=in_rows, other=1.0)
    rows64, cols64 = rows.to(tl.int64)[:, None], cols.to(tl.int64)[None, :]
    mask = in_rows[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + rows64 * stride_r + cols64 * stride_c, mask=mask, other=0.0).to(tl.float32)
    y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    y = tl.clamp(y, -TOP, TOP, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:  # rounded in fp32 first, so the cast is exact: the interpreter's FP8 cast rounds wrongly
        y = _round_to_grid(y, MANT, EMIN)
    q = y.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows64 * C + cols64, q, mask=mask)
    if TRANSPOSED:  # the same bytes into qt [C, R], stored as the [BLOCK_C, BLOCK_R] tile they are there
        t_offs = cols.to(tl.int64)[:, None] * R + rows.to(tl.int64)[None, :]
        tl.store(qt_ptr + t_offs, tl.trans(q), mask=(cols[:, None] < C) & (rows[None, :] < R))


@triton.jit
def _dequantize(q_ptr, scale_ptr, out_ptr, N, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(scale_ptr)
    x = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s
    if BF16:  # rounded to nearest even in integer arithmetic, so the cast is exact (the interpreter truncates)
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


_AMAX, _QUANTIZE, _DEQUANTIZE = Launcher(_amax), Launcher(_quantize), Launcher(_dequantize)


def _check(t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"triton_fp8: expected a 2-D tensor, got shape {tuple(t.shape)}")


def amax(t: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``fp8_quant.amax(t, rowwise)``: fp32 max of the finite ``|t|``, 0-dim or ``[rows, 1]``; ``t`` 2-D, any strides."""
    _check(t)
    rows, cols = t.shape
    out = torch.zeros(rows if rowwise else (), dtype=torch.float32, device=t.device)
    cfg = CONFIG["amax"]  # TILES: column tiles per program, fewer atomics on the tensorwise scalar
    grid = (cdiv(rows, cfg["BLOCK_R"]), cdiv(cols, cfg["BLOCK_C"] * cfg["TILES"]))
    if t.numel():
        _AMAX(grid, t, out, rows, cols, t.stride(0), t.stride(1), ROWWISE=rowwise, **cfg)
    return out.view(rows, 1) if rowwise else out


@functools.lru_cache(maxsize=None)
def _inv(top: float) -> float:
    """``1 / top`` rounded to fp32, as CUDA PyTorch divides by a Python number."""
    return (torch.tensor(1.0) / torch.tensor(top)).item()


@functools.lru_cache(maxsize=None)
def _constants(dtype: torch.dtype) -> dict:
    top = fp8_max(dtype)
    return dict(TOP=top, INV_TOP=_inv(top), MANT=FORMATS[dtype][0], EMIN=FORMATS[dtype][1])


def _launch(t, dtype, scale, m, rowwise: bool, transposed: bool = False):
    """``q``, and with ``transposed`` (a 16-bit ``t``: see ``quantize_pair``) also ``qt = q.T``, from one read of ``t``."""
    rows, cols = t.shape
    q = torch.empty(rows, cols, dtype=dtype, device=t.device)
    qt = torch.empty(cols, rows, dtype=dtype, device=t.device) if transposed else q
    cfg = CONFIG["quantize_pair" if transposed else "quantize"]
    grid = (cdiv(rows, cfg["BLOCK_R"]), cdiv(cols, cfg["BLOCK_C"]))
    if rows and cols:
        _QUANTIZE(grid, t, scale, m if m is not None else scale, q, qt, rows, cols, t.stride(0), t.stride(1),
                  RECIPROCAL=t.is_cuda, ROWWISE=rowwise, FROM_AMAX=m is not None, TRANSPOSED=transposed,
                  EXACT_ROUND=EXACT_ROUND or not t.is_cuda,
                  **_constants(dtype), **cfg)
    return (q, qt) if transposed else q


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fp8_quant.quantize``: ``saturate(t / scale)`` in ``dtype``, contiguous ``[rows, cols]``.

    ``scale``: fp32 on ``t``'s device, 0-dim (or one element) or ``[rows, 1]``; read by the kernel.
    """
    _check(t)
    rowwise = scale.numel() != 1
    if rowwise and scale.shape != (t.shape[0], 1):
        raise ValueError(f"triton_fp8.quantize: scale must be 0-dim or [{t.shape[0]}, 1], got {tuple(scale.shape)}")
    return _launch(t, dtype, scale.float().contiguous(), None, rowwise)


def quantize_dynamic(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_quant.quantize_dynamic``: ``(q, scale)``, the scale from ``t``'s own finite amax."""
    return quantize_from_amax(t, amax(t, rowwise), dtype)


def quantize_from_amax(t: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``scale = scale_from_amax(m)`` computed in the cast kernel: ``m`` is ``amax(t)``'s
    result, or one taken elsewhere (the FP8 all-gather's, all-reduced over the shard group)."""
    _check(t)
    scale = torch.empty_like(m)
    return _launch(t, dtype, scale, m, m.dim() == 2), scale


PAIRED_DTYPES = (torch.bfloat16, torch.float16)


def quantize_pair(t: torch.Tensor, dtype: torch.dtype, scale=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fp8_quant.quantize_pair``: ``(q, q.T [cols, padded(rows)], scale)``, tensorwise.

    One kernel writes both for bf16 and fp16 inputs whose row count is a
    multiple of 16 (token counts usually are). Otherwise ``q.T`` is a second
    cast, of ``t``'s transposed view: on the H100 (Triton 3.6) the paired
    store gave wrong bytes for fp32 inputs, for every shape, while the
    interpreter's were right (``scripts/gpu_fp8_pair_debug.py``).
    """
    _check(t)
    if scale is None:
        m = amax(t, False)
        scale = torch.empty_like(m)
    else:
        m, scale = None, scale.float().reshape(())
    rows = t.shape[0]
    rp = padded(rows)
    if t.dtype in PAIRED_DTYPES and rp == rows:
        q, qt = _launch(t, dtype, scale, m, False, transposed=True)
        return q, qt, scale
    q = _launch(t, dtype, scale, m, False)  # with m: also stores the scale the second cast reads
    tp = t if rp == rows else torch.cat([t, t.new_zeros(rp - rows, t.shape[1])])
    return q, _launch(tp.t(), dtype, scale, None, False), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = (q * scale)`` in ``out``'s dtype, the product in fp32 (``q`` contiguous FP8, ``scale`` fp32 0-dim,
    ``out`` contiguous with ``q``'s element count): one read of ``q``, one write."""
    if not (q.is_contiguous() and out.is_contiguous() and q.numel() == out.numel()):
        raise ValueError(f"triton_fp8.dequantize: contiguous q and out of one size, got {tuple(q.shape)}, "
                         f"{tuple(out.shape)}")
    if q.numel():
        block = 1024
        _DEQUANTIZE((cdiv(q.numel(), block),), q, scale.float().contiguous(), out, q.numel(),
                    BF16=out.dtype == torch.bfloat16, BLOCK=block, num_warps=4)
    return out
