"""CUDA kernels of the ``kp::fp8_*`` linears: ``torch._scaled_mm`` with fused casts.

The op bodies are those of the emulation (``ops/fp8.py``, ``ops/fp8_scaled.py``)
run with ``KERNELS`` instead of ``fp8_quant.EMULATED``:

- **GEMM**: ``torch._scaled_mm(a, b, scale_a, scale_b)``, ``a [M, K]``
  row-major, ``b [K, N]`` column-major (passed as ``q(w).t()`` of a
  row-major ``[N, K]`` tensor), fp32 scales that multiply (dequantization
  scales, as in the emulation). Tensorwise scales are 0-dim; rowwise
  ``[M, 1]`` and ``[1, N]``, and rowwise output is bf16 (the only rowwise
  output every torch from 2.9 on takes), cast afterwards. The second
  operand is always E4M3 (cuBLAS takes no E5M2 x E5M2, the rowwise CUTLASS
  kernel wants E4M3 there); gradients in E5M2 come first. K and N must be
  multiples of 16, which the ``fp8-linear`` step checks; the weight
  gradient contracts over tokens, so ``pad_tokens`` pads them with zero rows
  to a multiple of 16 (zeros change neither amax nor the product).
- **Bias**: fused into ``_scaled_mm`` where the output and bias are bf16,
  else added in fp32 after the GEMM.
- **Casts** (amax, scale, saturating cast), chosen per call by
  ``KP_FP8_CASTS``:

  - ``triton`` (the default for CUDA tensors): two hand-written Triton
    kernels, ``ops/triton_fp8.py`` (an amax reduction with atomic max, a
    scale-and-cast that reads the scale from device memory and can write
    the transpose too); the same bytes as ``fp8_quant``.
  - ``compiled`` (the default elsewhere, e.g. the CPU tests): the
    ``fp8_quant`` functions under a nested ``torch.compile(dynamic=True)``,
    one reduction and one pointwise kernel each, but Dynamo's guards and
    wrapper at every call (on an H100, the 8192^3 linear took 1.20 ms
    against 0.93 ms for its GEMM).
  - ``eager`` (also ``KP_FP8_EAGER_CASTS=1``): the ``fp8_quant`` functions
    as they are; their fp32 temporaries cost more than the FP8 GEMM saves.

``scaled_mm`` checks the layouts ``torch._scaled_mm`` needs on CUDA itself,
so the CPU tests (torch 2.13's CPU ``_scaled_mm``) catch a wrong layout too.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import fp8, fp8_gated, fp8_gated_quant, fp8_quant, fp8_scaled, fp8_shared, fp8_train  # noqa: F401  (fp8_shared: its ops get CUDA kernels below)
from .fp8_quant import ALIGN, Kernels


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def _col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) >= t.shape[0]


def scaled_mm(qa, sa, qb, sb, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
              fast_accum: bool = False) -> torch.Tensor:
    """``(qa * sa) @ (qb * sb).T (+ bias)`` through ``torch._scaled_mm`` (``qa [M, K]``, ``qb [N, K]``, row-major)."""
    b = qb.t()
    if not (_row_major(qa) and _col_major(b)):
        raise ValueError(f"fp8 scaled_mm: a must be row-major and b column-major; got strides {qa.stride()}, {b.stride()}")
    # a symbolic size here is a token count padded to a multiple of 16 (pad_tokens): testing it would add a guard
    if any(isinstance(d, int) and d % ALIGN for d in (qa.shape[1], qb.shape[0])):
        raise ValueError(f"fp8 scaled_mm: K={qa.shape[1]} and N={qb.shape[0]} must be multiples of {ALIGN}")
    rowwise = sa.dim() == 2
    if rowwise:
        sa, sb = sa.float().contiguous(), sb.float().reshape(1, -1).contiguous()
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    fuse_bias = bias is not None and bias.dtype == mm_dtype == torch.bfloat16
    out = torch._scaled_mm(qa, b, sa, sb, bias=bias if fuse_bias else None, out_dtype=mm_dtype,
                           use_fast_accum=fast_accum and not rowwise)
    if bias is not None and not fuse_bias:
        out = out.float() + bias.float()
    return out.to(out_dtype)


def cpu_scaled_mm(rowwise: bool = False) -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` runs tensorwise (with ``rowwise``: rowwise scales too),
    so the kernel bodies can run on the CPU: torch 2.9's takes per-tensor scales only, 2.13's both."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    scales = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.tensor(1.0), torch.tensor(1.0))
    try:
        torch._scaled_mm(a, a.t(), *scales, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """``t [M, C]`` with zero rows appended up to a multiple of 16 rows."""
    extra = -t.shape[0] % ALIGN
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, t.shape[1])])


CASTS = ("triton", "compiled", "eager")
RECOMPILE_LIMIT = 32


def casts_for(t: torch.Tensor) -> str:
    """The cast implementation for ``t``: ``KP_FP8_CASTS``, else ``eager`` under
    ``KP_FP8_EAGER_CASTS=1``, else ``triton`` on CUDA and ``compiled`` elsewhere."""
    mode = os.environ.get("KP_FP8_CASTS")
    if mode is None:
        if os.environ.get("KP_FP8_EAGER_CASTS") == "1":
            return "eager"
        return "triton" if t.is_cuda else "compiled"
    if mode not in CASTS:
        raise ValueError(f"KP_FP8_CASTS={mode!r} is not one of {CASTS}")
    return mode


@functools.lru_cache(maxsize=None)
def _casts(name: str, mode: str):
    if mode == "triton":
        from . import triton_fp8  # Triton is imported only where it runs

        return getattr(triton_fp8, name)
    fn = getattr(fp8_quant, name)
    if mode == "eager":
        return fn
    compiled = torch.compile(fn, dynamic=True)

    def run(*args):
        # One compiled variant per dtype, rowwise flag and layout (a transposed view for the
        # backward's operands): more than Dynamo's default 8 per function.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)

    return run


def _quantize_dynamic(t, dtype, rowwise):
    return _casts("quantize_dynamic", casts_for(t))(t, dtype, rowwise)


def _quantize(t, s, dtype):
    return _casts("quantize", casts_for(t))(t, s, dtype)


def _quantize_pair(t, dtype, s=None):
    return _casts("quantize_pair", casts_for(t))(t, dtype, s)


KERNELS = Kernels("scaled_mm", _quantize_dynamic, _quantize, scaled_mm, pad_tokens, _quantize_pair)


def _gated(name: str, t: torch.Tensor):
    """The gated activation's fused cast: ``triton_fp8_gated`` under ``triton`` casts, else the emulation's."""
    if casts_for(t) == "triton":
        from . import triton_fp8_gated

        return getattr(triton_fp8_gated, name)
    return getattr(fp8_gated_quant, name)


GATED = fp8_gated.Gated(lambda g, *a: _gated("gated_pair", g)(g, *a),
                        lambda d, *a: _gated("gated_grad_pairs", d)(d, *a))


def _linear(x, w, bias, recipe, fwd_dtype, grad_dtype, cache_weight=False, fast_accum=False):
    fp8._check(x, w, bias, recipe, fwd_dtype, grad_dtype)
    return fp8.forward(KERNELS, x, w, bias, recipe, fwd_dtype, cache_weight, fast_accum)


def _linear_backward(grad, x, w, recipe, fwd_dtype, grad_dtype):
    return fp8.backward(KERNELS, grad, x, w, recipe, fwd_dtype, grad_dtype)


def _linear_scaled(x, w, bias, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin, cache_weight=False,
                   fast_accum=False):
    fp8._check(x, w, bias, recipe, fwd_dtype, grad_dtype, fp8_scaled.RECIPES)
    return fp8_scaled.forward(KERNELS, x, w, bias, x_scale, w_scale, fwd_dtype, cache_weight, fast_accum)


def _linear_scaled_backward(grad, x, w, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin):
    return fp8_scaled.backward(KERNELS, grad, x, w, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin)


def _linear_train(x, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    fp8._check(x, w, bias, "tensorwise", fwd_dtype, grad_dtype)
    return fp8_train.forward(KERNELS, x, w, bias, fwd_dtype, fast_accum)


def _linear_train_backward(grad, qxt, qwt, sx, sw, grad_dtype, w_dtype):
    return fp8_train.backward(KERNELS, grad, qxt, qwt, sx, sw, grad_dtype, w_dtype)


def _cast_pair(x, dtype):
    return fp8_train.cast(KERNELS, x, dtype)


def _linear_shared(x, qx, qxt, sx, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    fp8._check(x, w, bias, "tensorwise", fwd_dtype, grad_dtype)
    return fp8_train.linear(KERNELS, x, qx, sx, w, bias, fwd_dtype, fast_accum)


def _gated_mlp(x, qx, qxt, sx, w_gate, w_up, w_down, activation, fwd_dtype, grad_dtype, fast_accum=False):
    fp8_gated.check(x, w_gate, w_up, w_down, activation, fwd_dtype, grad_dtype)
    return fp8_gated.forward(KERNELS, GATED, x, qx, sx, w_gate, w_up, w_down, activation, fwd_dtype, fast_accum)


def _gated_mlp_backward(grad, *saved_and_args):
    return fp8_gated.backward(KERNELS, GATED, grad, *saved_and_args)


# On the dispatcher's CUDA key directly, as the routed-experts kernels (lowering/moe.py): custom_op's
# register_kernel wrapper adds per-call host work, and these run once per linear per step. Every
# kernel returns fresh tensors (GEMM outputs), never an input.
_CUDA = torch.library.Library("kp", "IMPL")
for _name, _fn in (("fp8_linear", _linear), ("fp8_linear_backward", _linear_backward),
                   ("fp8_linear_scaled", _linear_scaled), ("fp8_linear_scaled_backward", _linear_scaled_backward),
                   ("fp8_linear_train", _linear_train), ("fp8_linear_train_backward", _linear_train_backward),
                   ("fp8_cast_pair", _cast_pair), ("fp8_linear_shared", _linear_shared),
                   ("fp8_gated_mlp_train", _gated_mlp), ("fp8_gated_mlp_train_backward", _gated_mlp_backward)):
    _CUDA.impl(_name, _fn, "CUDA")
