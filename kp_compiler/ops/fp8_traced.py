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
from .fp8_quant import ALIGN, EMULATED, Kernels, amax, quantize, quantize_dynamic, scale_from_amax


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """``t [M, C]`` with ``-M % 16`` zero rows appended (none when aligned), without branching on ``M``."""
    return F.pad(t, (0, 0, 0, (-t.shape[0]) % ALIGN))


def quantize_pair(t: torch.Tensor, dtype: torch.dtype, s=None):
    """``fp8_quant.quantize_pair`` without the branch on the row count."""
    if s is None:
        s = scale_from_amax(amax(t, False), dtype)
    return quantize(t, s, dtype), quantize(pad_tokens(t).t(), s, dtype), s


TRACED_CASTS = "kp_fp8_traced_casts"  # GraphModule.meta key the fp8-linear pass sets, lowering/decompositions reads
MODES = ("inductor", "mixed")  # what options["fp8"]["casts"] decomposes: every cast, or all but the weights'
TRACED = Kernels("traced", quantize_dynamic, quantize, scaled_mm, pad_tokens, quantize_pair)


@torch.library.custom_op("kp::fp8_weight_pair", mutates_args=())
def fp8_weight_pair(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q(w), q(w).T, scale)`` of a 2-D weight, tensorwise: the weight cast ``casts="mixed"`` leaves opaque
    (on CUDA one paired Triton kernel, ``ops/triton_fp8.py``; elsewhere the exact emulation)."""
    return EMULATED.quantize_pair(w, dtype)


@fp8_weight_pair.register_fake
def _(w, dtype):
    n, k = w.shape
    return w.new_empty(n, k, dtype=dtype), w.new_empty(k, n, dtype=dtype), w.new_empty((), dtype=torch.float32)


def _weight_pair_cuda(w, dtype):
    from .fp8_cuda import KERNELS

    return KERNELS.quantize_pair(w, dtype)


_CUDA = torch.library.Library("kp", "IMPL")  # kept: a Library unregisters its kernels when collected
_CUDA.impl("fp8_weight_pair", _weight_pair_cuda, "CUDA")  # on the key directly, as fp8_cuda's ops
WEIGHTS_OPAQUE = TRACED._replace(name="traced, weights opaque",
                                 quantize_pair=lambda w, dtype, s=None: torch.ops.kp.fp8_weight_pair(w, dtype))


def _forward(weights: Kernels, x, w, bias, fwd_dtype, fast_accum):
    qx, qxt, sx = fp8_train.cast(TRACED, x, fwd_dtype)
    out, qwt, sw = fp8_train.linear(weights, x, qx, sx, w, bias, fwd_dtype, fast_accum)
    return out, qxt, qwt, sx, sw


def decompositions(mode: str = "inductor") -> dict:
    """``{op: body}`` for ``compile_fx(decompositions=...)``; ``mode`` one of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"fp8_traced: mode {mode!r} is not one of {MODES}")
    weights = TRACED if mode == "inductor" else WEIGHTS_OPAQUE
    kp = torch.ops.kp

    def linear_train(x, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
        return _forward(weights, x, w, bias, fwd_dtype, fast_accum)

    def linear_train_backward(grad, qxt, qwt, sx, sw, grad_dtype, w_dtype):
        return fp8_train.backward(TRACED, grad, qxt, qwt, sx, sw, grad_dtype, w_dtype)

    def cast_pair(x, dtype):
        return fp8_train.cast(TRACED, x, dtype)

    def linear_shared(x, qx, qxt, sx, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
        return fp8_train.linear(weights, x, qx, sx, w, bias, fwd_dtype, fast_accum)

    return {kp.fp8_linear_train.default: linear_train, kp.fp8_linear_train_backward.default: linear_train_backward,
            kp.fp8_cast_pair.default: cast_pair, kp.fp8_linear_shared.default: linear_shared}
