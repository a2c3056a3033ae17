"""FP8 numerics shared by every ``kp::fp8_*`` kernel: amax, scales, saturating casts, the scaled GEMM.

A scale here is the *dequantization* scale: ``t ~ q(t) * scale`` with
``q(t) = saturate(t / scale)``, so ``scale = amax / fp8_max`` (times
``2**margin`` for delayed scaling). ``torch._scaled_mm(a, b, scale_a, scale_b)``
multiplies by scales of exactly this kind.

``Kernels`` bundles the three device-dependent steps (dynamic quantization,
quantization with a given scale, the GEMM); ``EMULATED`` is the exact CPU
emulation, ``ops/fp8_cuda.py`` builds the CUDA one on ``torch._scaled_mm``.
The op bodies (``ops/fp8.py``, ``ops/fp8_scaled.py``) are written once
against a ``Kernels``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def amax(t: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """fp32 max of ``|t|`` over the finite values: a 0-dim tensor, or ``[rows, 1]`` rowwise.

    Non-finite values are left out so that one inf does not wipe out the
    scale of everything else; the cast then saturates it (see ``quantize``).
    """
    a = t.detach().abs().float()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))
    return a.amax(dim=-1, keepdim=True) if rowwise else a.amax()


def scale_from_amax(m: torch.Tensor, dtype: torch.dtype, margin: float = 0.0) -> torch.Tensor:
    """``amax / fp8_max * 2**margin``; 1 where ``amax`` is 0 (any scale represents zeros)."""
    return torch.where(m > 0, m / fp8_max(dtype) * 2.0 ** margin, torch.ones_like(m))


def quantize(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t / s`` cast to ``dtype``, saturating at the format's largest finite value (inf too); contiguous."""
    top = fp8_max(dtype)
    return (t.float() / s).clamp(-top, top).to(dtype).contiguous()


def quantize_dynamic(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with the scale taken from ``t``'s own (finite) amax."""
    s = scale_from_amax(amax(t, rowwise), dtype)
    return quantize(t, s, dtype), s


ALIGN = 16  # torch._scaled_mm's alignment of the contraction and output dims


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGN``."""
    return -(-n // ALIGN) * ALIGN


def quantize_pair(t: torch.Tensor, dtype: torch.dtype,
                  s: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q(t), q(t).T, scale)`` of a 2-D ``t [R, C]`` with one (tensorwise) scale, ``t``'s own unless given.

    ``q(t).T`` is contiguous ``[C, padded(R)]``, its extra columns zero: the
    operand of a GEMM that contracts over ``t``'s rows (the backward's weight
    gradient contracts over tokens). The two are the same bytes laid out
    twice, so a training step quantizes each tensor once.
    """
    if s is None:
        s = scale_from_amax(amax(t, False), dtype)
    tt = t.t()
    extra = padded(t.shape[0]) - t.shape[0]
    if extra:  # zeros quantize to zeros
        tt = torch.cat([tt, tt.new_zeros(tt.shape[0], extra)], 1)
    return quantize(t, s, dtype), quantize(tt, s, dtype), s


def emulated_mm(qa, sa, qb, sb, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                fast_accum: bool = False) -> torch.Tensor:
    """``(qa * sa) @ (qb * sb).T (+ bias)`` in fp32, cast to ``out_dtype`` (``qa [M, K]``, ``qb [N, K]``).

    ``fast_accum`` (the GPU's faster, less precise FP8 accumulation) is not emulated: fp32 throughout.
    """
    out = (qa.float() * sa) @ (qb.float() * sb).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Kernels(NamedTuple):
    """The device-dependent steps of an FP8 linear.

    ``mm(qa, sa, qb, sb, out_dtype, bias, fast_accum=False)`` computes ``(qa*sa) @ (qb*sb).T``
    from row-major ``qa [M, K]`` and ``qb [N, K]``, with 0-dim scales
    (tensorwise) or ``[M, 1]`` / ``[N, 1]`` (rowwise). ``pad_tokens(t)``
    pads a ``[M, C]`` tensor with zero rows where the GEMM's contraction
    over tokens needs it (the backward's weight gradient).
    ``quantize_pair(t, dtype, scale=None)`` is ``fp8_quant.quantize_pair``.
    """

    name: str
    quantize_dynamic: Callable
    quantize: Callable
    mm: Callable
    pad_tokens: Callable
    quantize_pair: Callable


EMULATED = Kernels("emulated", quantize_dynamic, quantize, emulated_mm, lambda t: t, quantize_pair)
