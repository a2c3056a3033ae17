"""``kp::fp8_linear_train``: the dynamic tensorwise FP8 linear of a training graph, quantizing each tensor once.

``fp8_linear_train(x [*, K], w [N, K], bias [N] or None, fwd_dtype, grad_dtype,
fast_accum=False) -> (out, qxt, qwt, sx, sw)`` computes what ``kp::fp8_linear(..., "tensorwise")``
computes, and also returns the FP8 operands its backward needs:

- ``qxt = q(x).T`` ``[K, Mp]`` (``M`` padded to a multiple of 16 with zeros) and ``qwt = q(w).T`` ``[K, N]``, written
  by the same kernel that writes ``q(x)`` and ``q(w)`` (one read of ``x`` and
  ``w``), and their scales ``sx``, ``sw`` (0-dim fp32).

One scale per tensor is the same for a tensor and its transpose, so these
are exactly the operands ``kp::fp8_linear``'s backward quantizes again from
``x`` and ``w`` (two more amax passes and two more casts per linear). The
backward, ``kp::fp8_linear_train_backward(grad, qxt, qwt, sx, sw, grad_dtype,
w_dtype)``, casts ``grad`` once into ``q(g)`` and ``q(g).T`` (E5M2) and runs
``grad_x = q(g) @ q(w)`` and ``grad_w = q(g).T @ q(x)`` (over the padded tokens). The autograd graph
keeps the FP8 operands (1 byte per value) instead of ``x`` and ``w``.

The four extra outputs are not differentiable. The ``fp8-linear`` step emits
this op for training graphs with the default recipe and takes output 0::

    %fp8_linear_train = kp.fp8_linear_train.default(%x, %w, %b, torch.float8_e4m3fn, torch.float8_e5m2, True)
    %getitem = getitem(%fp8_linear_train, 0)

As in ``ops/fp8.py``, the default implementation is the exact emulation;
``ops/fp8_cuda.py`` registers the CUDA kernels for the same body.
"""

from __future__ import annotations

from typing import Optional

import torch

from .fp8 import _check, bias_grad
from .fp8_quant import EMULATED, Kernels, padded


def cast(k: Kernels, x, dtype):
    """``(q(x) [M, K], q(x).T [K, Mp], sx)`` of ``x [*, K]``."""
    return k.quantize_pair(x.reshape(-1, x.shape[-1]), dtype)


def linear(k: Kernels, x, qx, sx, w, bias, fwd_dtype, fast_accum=False):
    """``(out, q(w).T, sw)``: ``q(x) @ q(w).T`` from a cast ``x`` (``x`` itself gives the output's shape)."""
    qw, qwt, sw = k.quantize_pair(w, fwd_dtype)
    out = k.mm(qx, sx, qw, sw, x.dtype, bias, fast_accum=fast_accum).reshape(*x.shape[:-1], w.shape[0])
    return out, qwt, sw


def forward(k: Kernels, x, w, bias, fwd_dtype, fast_accum=False):
    qx, qxt, sx = cast(k, x, fwd_dtype)
    out, qwt, sw = linear(k, x, qx, sx, w, bias, fwd_dtype, fast_accum)
    return out, qxt, qwt, sx, sw


def backward(k: Kernels, grad, qxt, qwt, sx, sw, grad_dtype, w_dtype):
    """``(grad_x, grad_w)``: ``q(g) [M, N] @ q(w) [N, K]`` and ``q(g).T [N, Mp] @ q(x) [Mp, K]``."""
    g2 = grad.reshape(-1, grad.shape[-1])
    qg, qgt, sg = k.quantize_pair(g2, grad_dtype)
    grad_x = k.mm(qg, sg, qwt, sw, grad.dtype)
    grad_w = k.mm(qgt, sg, qxt, sx, w_dtype)
    return grad_x.reshape(*grad.shape[:-1], qwt.shape[0]), grad_w


@torch.library.custom_op("kp::fp8_linear_train", mutates_args=())
def fp8_linear_train(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], fwd_dtype: torch.dtype,
                     grad_dtype: torch.dtype, fast_accum: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, w, bias, "tensorwise", fwd_dtype, grad_dtype)
    return forward(EMULATED, x, w, bias, fwd_dtype, fast_accum)


@fp8_linear_train.register_fake
def _(x, w, bias, fwd_dtype, grad_dtype, fast_accum=False):
    m = x.numel() // x.shape[-1]
    k, n = w.shape[1], w.shape[0]
    scale = x.new_empty((), dtype=torch.float32)
    return (x.new_empty(*x.shape[:-1], n), x.new_empty(k, padded(m), dtype=fwd_dtype),
            w.new_empty(k, n, dtype=fwd_dtype), scale, scale.clone())


@torch.library.custom_op("kp::fp8_linear_train_backward", mutates_args=())
def fp8_linear_train_backward(grad: torch.Tensor, qxt: torch.Tensor, qwt: torch.Tensor, sx: torch.Tensor,
                              sw: torch.Tensor, grad_dtype: torch.dtype,
                              w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(EMULATED, grad, qxt, qwt, sx, sw, grad_dtype, w_dtype)


@fp8_linear_train_backward.register_fake
def _(grad, qxt, qwt, sx, sw, grad_dtype, w_dtype):
    k, n = qwt.shape
    return grad.new_empty(*grad.shape[:-1], k), grad.new_empty(n, k, dtype=w_dtype)


def _setup_context(ctx, inputs, output):
    _, w, bias, _, grad_dtype, _ = inputs
    _, qxt, qwt, sx, sw = output
    ctx.mark_non_differentiable(qxt, qwt, sx, sw)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qxt, qwt, sx, sw)
    ctx.args = (grad_dtype, w.dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, *unused):
    if grad is None:  # the output took no part in the loss
        return None, None, None, None, None, None
    qxt, qwt, sx, sw = ctx.saved_tensors
    grad_x, grad_w = torch.ops.kp.fp8_linear_train_backward(grad, qxt, qwt, sx, sw, *ctx.args)
    return grad_x, grad_w, bias_grad(grad) if ctx.has_bias else None, None, None, None


fp8_linear_train.register_autograd(_backward, setup_context=_setup_context)
