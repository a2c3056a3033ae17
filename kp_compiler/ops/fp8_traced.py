"""The FP8 training ops written as ATen ops, for Inductor to compile and fuse (``options["fp8"]["casts"]``).

With ``casts="inductor"`` the Inductor lowering hands ``compile_fx`` these functions as decompositions of
``kp::fp8_linear_train``, ``kp::fp8_linear_train_backward``, ``kp::fp8_cast_pair`` and
``kp::fp8_linear_shared``. AOTAutograd traces the ops' autograd formulas first (the backward still calls
``kp::fp8_linear_train_backward``), then replaces each op by its body below: amax, scale and saturating cast
as ``fp8_quant``'s torch functions, the GEMMs as ``torch._scaled_mm`` (``fp8_cuda.scaled_mm``). Inductor then
generates the casts itself, fusing the amax and the cast into the kernels that produce their input (the
norm, the gated activation, the activation's gradient) where it can, and launches them with its own
launcher instead of a Python call per kernel (``ops/triton_fp8.py``).

Before (the forward graph AOTAutograd would hand Inductor)::

    %fp8_linear_train = kp.fp8_linear_train.default(%x, %w, None, torch.float8_e4m3fn, torch.float8_e5m2, True)

After::

    %abs = aten.abs.default(%x) ... %amax = aten.amax.default(%where)
    %div = aten.div.Tensor(%amax, 448.0) ... %scale = aten.where.self(%gt, %div, %ones_like)
    %q = prims.convert_element_type.default(%clamp, torch.float8_e4m3fn) ...
    %scaled_mm = aten._scaled_mm.default(%q, %permute, %scale, %scale_1, None, None, torch.bfloat16, True)

The values equal the ops' to fp32 rounding (``torch._scaled_mm`` applies the scales after the product:
``tests/lowering/test_fp8_traced.py``). The token padding of the transposed operand is a pad by ``-M % 16``
rows, not a test of ``M`` (no guard, should the pass ever convert a graph with a symbolic token count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8_train
from .fp8_cuda import scaled_mm
from .fp8_quant import ALIGN, Kernels, amax, quantize, quantize_dynamic, scale_from_amax


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """``t [M, C]`` with ``-M % 16`` zero rows appended (none when aligned), without branching on ``M``."""
    return F.pad(t, (0, 0, 0, (-t.shape[0]) % ALIGN))


def quantize_pair(t: torch.Tensor, dtype: torch.dtype, s=None):
    """``fp8_quant.quantize_pair`` without the branch on the row count."""
    if s is None:
        s = scale_from_amax(amax(t, False), dtype)
    return quantize(t, s, dtype), quantize(pad_tokens(t).t(), s, dtype), s


TRACED_CASTS = "kp_fp8_traced_casts"  # GraphModule.meta key the fp8-linear pass sets, lowering/decompositions reads
# Where the fp8-linear pass asks for the decomposition: CUDA, where it was measured. Not the CPU: there the
# ops' emulation is the reference, and torch 2.9's CPU Inductor crashed (SIGSEGV) on fp32 graphs of these
# bodies (tests/lowering/test_fp8_traced.py adds "cpu" here under torch 2.13, where they compile).
DEVICES = ("cuda",)
TRACED = Kernels("traced", quantize_dynamic, quantize, scaled_mm, pad_tokens, quantize_pair)


def _linear_train(x, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    return fp8_train.forward(TRACED, x, w, bias, fwd_dtype, fast_accum)


def _linear_train_backward(grad, qxt, qwt, sx, sw, grad_dtype, w_dtype):
    return fp8_train.backward(TRACED, grad, qxt, qwt, sx, sw, grad_dtype, w_dtype)


def _cast_pair(x, dtype):
    return fp8_train.cast(TRACED, x, dtype)


def _linear_shared(x, qx, qxt, sx, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    return fp8_train.linear(TRACED, x, qx, sx, w, bias, fwd_dtype, fast_accum)


def decompositions() -> dict:
    """``{op: body}`` for ``compile_fx(decompositions=...)``."""
    kp = torch.ops.kp
    return {kp.fp8_linear_train.default: _linear_train, kp.fp8_linear_train_backward.default: _linear_train_backward,
            kp.fp8_cast_pair.default: _cast_pair, kp.fp8_linear_shared.default: _linear_shared}
