"""``kp::fp8_linear``: ``x @ w.T + b`` with both operands cast to FP8 and scaled, forward and backward.

``fp8_linear(x [*, K], w [N, K], bias [N] or None, recipe, fwd_dtype, grad_dtype, cache_weight=False, fast_accum=False)``
with dynamic scaling (scales from the current values; no state):

- ``recipe="tensorwise"``: one scale per tensor, ``scale = amax / fp8_max``.
- ``recipe="rowwise"``: ``x`` gets one scale per row (token), ``w`` one per
  output row, and ``grad`` one per row too.

The forward operands are cast to ``fwd_dtype`` (E4M3). In the backward, the
incoming gradient is cast to ``grad_dtype`` (E5M2). Then ``grad_x = q(g) @ q(w)``
and ``grad_w = q(g).T @ q(x)``: both backward GEMMs run in FP8 too.

Casts saturate: values are clamped to the format's largest finite value
first, infinities included. The amax is taken over the finite values, so an
inf saturates instead of turning every other value into 0 or NaN: the result
is finite wherever the input rows are (NaN stays NaN). A tensor (or row)
whose amax is 0 gets scale 1. Delayed and static scaling, which keep state
and count these events, are ``ops/fp8_scaled.py``.

``cache_weight=True`` (the step sets it for graphs compiled under
``torch.no_grad()``) quantizes ``w`` once and reuses it until the weight
changes (``ops/fp8_weights.py``).

The default implementation is the exact emulation (``fp8_quant.EMULATED``):
quantize, dequantize to fp32, multiply in fp32. ``ops/fp8_cuda.py``
registers the CUDA kernel (``torch._scaled_mm``) for the same body.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import fp8_weights
from .fp8_quant import EMULATED, Kernels, fp8_max  # noqa: F401  (fp8_max re-exported)

RECIPES = ("tensorwise", "rowwise")


def weight_q(k: Kernels, w: torch.Tensor, dtype: torch.dtype, rowwise: bool, cache: bool):
    """``(q(w), scale)``, from the inference cache when ``cache``."""
    if not cache:
        return k.quantize_dynamic(w, dtype, rowwise)
    return fp8_weights.cached(w, (k.name, dtype, rowwise), lambda: k.quantize_dynamic(w, dtype, rowwise))


def forward(k: Kernels, x, w, bias, recipe, fwd_dtype, cache_weight=False, fast_accum=False):
    rowwise = recipe == "rowwise"
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx = k.quantize_dynamic(x2, fwd_dtype, rowwise)
    qw, sw = weight_q(k, w, fwd_dtype, rowwise, cache_weight)
    return k.mm(qx, sx, qw, sw, x.dtype, bias, fast_accum=fast_accum).reshape(*x.shape[:-1], w.shape[0])


def backward(k: Kernels, grad, x, w, recipe, fwd_dtype, grad_dtype):
    """``(grad_x, grad_w)`` from FP8 operands, every scale dynamic."""
    rowwise = recipe == "rowwise"
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    qg, sg = k.quantize_dynamic(g2, grad_dtype, rowwise)
    # grad_x [M, K] = g [M, N] @ w [N, K]: the contraction runs over N, so the second operand is
    # w.T [K, N], quantized from a transposed copy (rowwise: one scale per K).
    qwt, swt = k.quantize_dynamic(w.t(), fwd_dtype, rowwise)
    grad_x = k.mm(qg, sg, qwt, swt, x.dtype)
    # grad_w [N, K] = g.T [N, M] @ x [M, K]: contraction over tokens, scales per N and per K.
    if rowwise or k.pad_tokens(g2) is not g2:
        g2, x2 = k.pad_tokens(g2), k.pad_tokens(x2)
        qgt, sgt = k.quantize_dynamic(g2.t(), grad_dtype, rowwise)
    else:  # one scale, the same as q(g)'s: no second amax over g (a copy of q(g).T took 9x longer on an H100)
        qgt, sgt = k.quantize(g2.t(), sg, grad_dtype), sg
    qxt, sxt = k.quantize_dynamic(x2.t(), fwd_dtype, rowwise)
    grad_w = k.mm(qgt, sgt, qxt, sxt, w.dtype)
    return grad_x.reshape(x.shape), grad_w


def _check(x, w, bias, recipe, fwd_dtype, grad_dtype, recipes=RECIPES) -> None:
    if recipe not in recipes:
        raise ValueError(f"kp::fp8_linear: recipe {recipe!r} is not one of {recipes}")
    for name, dt in (("fwd_dtype", fwd_dtype), ("grad_dtype", grad_dtype)):
        if dt.itemsize != 1 or not dt.is_floating_point:
            raise ValueError(f"kp::fp8_linear: {name} must be an FP8 dtype, got {dt}")
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or (bias is not None and bias.shape != (w.shape[0],)):
        raise ValueError(f"kp::fp8_linear: x [*, K], w [N, K], bias [N]; got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")


@torch.library.custom_op("kp::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], recipe: str,
               fwd_dtype: torch.dtype, grad_dtype: torch.dtype, cache_weight: bool = False,
               fast_accum: bool = False) -> torch.Tensor:
    _check(x, w, bias, recipe, fwd_dtype, grad_dtype)
    return forward(EMULATED, x, w, bias, recipe, fwd_dtype, cache_weight, fast_accum)


@fp8_linear.register_fake
def _(x, w, bias, recipe, fwd_dtype, grad_dtype, cache_weight=False, fast_accum=False):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("kp::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, recipe: str,
                        fwd_dtype: torch.dtype, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w)``, both GEMMs on FP8 operands (``grad`` in ``grad_dtype``)."""
    return backward(EMULATED, grad, x, w, recipe, fwd_dtype, grad_dtype)


@fp8_linear_backward.register_fake
def _(grad, x, w, recipe, fwd_dtype, grad_dtype):
    return torch.empty_like(x), torch.empty_like(w)


def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


def _setup_context(ctx, inputs, output):
    x, w, bias, recipe, fwd_dtype, grad_dtype, _, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (recipe, fwd_dtype, grad_dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    grad_x, grad_w = torch.ops.kp.fp8_linear_backward(grad, x, w, *ctx.args)
    return grad_x, grad_w, bias_grad(grad) if ctx.has_bias else None, None, None, None, None, None


fp8_linear.register_autograd(_backward, setup_context=_setup_context)
