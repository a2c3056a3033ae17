"""``kp::fp8_cast_pair`` + ``kp::fp8_linear_shared``: training linears that read the same input cast it once.

A SwiGLU MLP's gate and up projections (an attention block's q, k and v)
read one activation ``x``. With ``kp::fp8_linear_train`` each of them takes
``x``'s amax and writes ``q(x)`` and ``q(x).T`` again; here the ``fp8-linear``
step casts ``x`` once and hands the FP8 operands to every consumer:

- ``fp8_cast_pair(x [*, K], dtype) -> (qx [M, K], qxt [K, Mp], sx)``:
  ``fp8_quant.quantize_pair`` of ``x`` (tensorwise, its own amax). Its
  outputs are not differentiable: no gradient flows through a cast.
- ``fp8_linear_shared(x, qx, qxt, sx, w, bias, fwd_dtype, grad_dtype,
  fast_accum) -> (out, qwt, sw)``: ``out = q(x) @ q(w).T`` from the given
  operands. ``x`` itself is read only for its shape and to route the
  gradient: the backward is ``kp::fp8_linear_train_backward`` (``grad_x =
  q(g) @ q(w)``, ``grad_w = q(g).T @ q(x)``), and autograd sums the ``grad_x``
  of the consumers, as it does for the linears they replace.

Each consumer computes exactly what ``kp::fp8_linear_train`` computes (the
same bytes: ``tests/ops/test_fp8_shared.py``)::

    %fp8_cast_pair = kp.fp8_cast_pair.default(%x, torch.float8_e4m3fn)
    %qx = getitem(%fp8_cast_pair, 0) ...
    %fp8_linear_shared = kp.fp8_linear_shared.default(%x, %qx, %qxt, %sx, %w_gate, None, ...)
    %fp8_linear_shared_1 = kp.fp8_linear_shared.default(%x, %qx, %qxt, %sx, %w_up, None, ...)
"""

from __future__ import annotations

from typing import Optional

import torch

from .fp8 import _check, bias_grad
from .fp8_quant import EMULATED, padded
from .fp8_train import cast, linear  # the two halves of kp::fp8_linear_train's forward


@torch.library.custom_op("kp::fp8_cast_pair", mutates_args=())
def fp8_cast_pair(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dtype.itemsize != 1 or not dtype.is_floating_point:
        raise ValueError(f"kp::fp8_cast_pair: dtype must be an FP8 dtype, got {dtype}")
    return cast(EMULATED, x, dtype)


@fp8_cast_pair.register_fake
def _(x, dtype):
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    return (x.new_empty(m, k, dtype=dtype), x.new_empty(k, padded(m), dtype=dtype), x.new_empty((), dtype=torch.float32))


def _cast_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _cast_backward(ctx, *grads):
    return None, None


fp8_cast_pair.register_autograd(_cast_backward, setup_context=_cast_setup)


@torch.library.custom_op("kp::fp8_linear_shared", mutates_args=())
def fp8_linear_shared(x: torch.Tensor, qx: torch.Tensor, qxt: torch.Tensor, sx: torch.Tensor, w: torch.Tensor,
                      bias: Optional[torch.Tensor], fwd_dtype: torch.dtype, grad_dtype: torch.dtype,
                      fast_accum: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, w, bias, "tensorwise", fwd_dtype, grad_dtype)
    return linear(EMULATED, x, qx, sx, w, bias, fwd_dtype, fast_accum)


@fp8_linear_shared.register_fake
def _(x, qx, qxt, sx, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    k, n = w.shape[1], w.shape[0]
    return x.new_empty(*x.shape[:-1], n), w.new_empty(k, n, dtype=fwd_dtype), x.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, _, qxt, sx, w, bias, _, grad_dtype, _ = inputs
    _, qwt, sw = output
    ctx.mark_non_differentiable(qwt, sw)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qxt, qwt, sx, sw)
    ctx.args = (grad_dtype, w.dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, *unused):
    if grad is None:
        return (None,) * 9
    qxt, qwt, sx, sw = ctx.saved_tensors
    grad_x, grad_w = torch.ops.kp.fp8_linear_train_backward(grad, qxt, qwt, sx, sw, *ctx.args)
    return grad_x, None, None, None, grad_w, bias_grad(grad) if ctx.has_bias else None, None, None, None


fp8_linear_shared.register_autograd(_backward, setup_context=_setup_context)
