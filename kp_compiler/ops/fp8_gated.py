"""``kp::fp8_gated_mlp_train``: a SwiGLU/GEGLU MLP's three FP8 linears with the gated activation's casts fused.

``fp8_gated_mlp_train(x, qx, qxt, sx, w_gate, w_up, w_down, activation,
fwd_dtype, grad_dtype, fast_accum) -> (out, ...)`` computes, from the cast
``x`` (``kp::fp8_cast_pair``), what ``kp::fp8_linear_shared`` (gate, up), the
activation and ``kp::fp8_linear_train`` (down) compute one by one::

    g = q(x) @ q(w_gate).T;  u = q(x) @ q(w_up).T       (bf16 out)
    out = q(act(g) * u) @ q(w_down).T

but ``act(g) * u`` goes from ``g`` and ``u`` straight to FP8
(``fp8_gated_quant.gated_pair``: never stored in 16 bits, no separate amax
pass over it). The backward (``kp::fp8_gated_mlp_train_backward``) casts the
output gradient once, runs the down projection's two GEMMs, then casts the
gate and up gradients from ``dh``, ``g`` and ``u`` in the same way
(``gated_grad_pairs``), and runs the four gate/up GEMMs; ``grad_x`` is the
sum of the gate's and the up projection's, as autograd sums them for the
separate linears. A SwiGLU MLP in FP8 is then nine GEMMs, four casts of the
weights and three of the activations and gradients (``x``, ``dout`` and the
two fused ones), where it was eight casts and two pointwise kernels more.

Outputs 1-10 are what the backward reads (``g``, ``u`` ``[M, F]``, the FP8
operands and their scales); they are not differentiable. The ``fp8-linear``
step emits this op for a training graph's gated MLP whose three linears it
converts, and takes output 0::

    %fp8_gated_mlp_train = kp.fp8_gated_mlp_train.default(%x, %qx, %qxt, %sx, %w_gate, %w_up, %w_down, 'silu', ...)
    %getitem = getitem(%fp8_gated_mlp_train, 0)

The default implementation is the exact emulation; the CUDA kernel runs the
same body on ``torch._scaled_mm`` and the Triton casts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fp8_gated_quant
from .fp8 import _check
from .fp8_quant import EMULATED, Kernels, padded
from .fp8_train import linear


class Gated(NamedTuple):
    """The fused casts: ``fp8_gated_quant``'s functions, or the Triton kernels of ``triton_fp8_gated``."""

    pair: object
    grad_pairs: object


EMULATED_GATED = Gated(fp8_gated_quant.gated_pair, fp8_gated_quant.gated_grad_pairs)


def check(x, w_gate, w_up, w_down, activation, fwd_dtype, grad_dtype) -> None:
    fp8_gated_quant.check_activation(activation)
    _check(x, w_gate, None, "tensorwise", fwd_dtype, grad_dtype)
    if w_up.shape != w_gate.shape or w_down.dim() != 2 or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"kp::fp8_gated_mlp_train: w_gate and w_up [F, D], w_down [E, F]; got "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if len({x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype}) != 1:
        raise ValueError(f"kp::fp8_gated_mlp_train: x and the weights must share one dtype; got {x.dtype}, "
                         f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")


def forward(k: Kernels, gk: Gated, x, qx, sx, w_gate, w_up, w_down, activation, fwd_dtype, fast_accum=False):
    """``(out, g, u, q(h).T, sh, q(w_gate).T, q(w_up).T, q(w_down).T, s_gate, s_up, s_down)``."""
    g, qwgt, swg = linear(k, x, qx, sx, w_gate, None, fwd_dtype, fast_accum)
    u, qwut, swu = linear(k, x, qx, sx, w_up, None, fwd_dtype, fast_accum)
    g, u = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
    qh, qht, sh = gk.pair(g, u, activation, fwd_dtype)
    out, qwdt, swd = linear(k, g, qh, sh, w_down, None, fwd_dtype, fast_accum)
    return out.reshape(*x.shape[:-1], w_down.shape[0]), g, u, qht, sh, qwgt, qwut, qwdt, swg, swu, swd


def backward(k: Kernels, gk: Gated, grad, g, u, qxt, sx, qht, sh, qwgt, qwut, qwdt, swg, swu, swd, activation,
             grad_dtype, w_dtype):
    """``(grad_x, grad_w_gate, grad_w_up, grad_w_down)``; ``grad [*, E]``. Each temporary is let go after its
    last use (the separate ops' backwards free theirs between ops)."""
    g2 = grad.reshape(-1, grad.shape[-1])
    qd, qdt, sd = k.quantize_pair(g2, grad_dtype)
    dh = k.mm(qd, sd, qwdt, swd, grad.dtype)  # [M, F] = q(dout) @ q(w_down)
    grad_w_down = k.mm(qdt, sd, qht, sh, w_dtype)  # [E, F] = q(dout).T @ q(h)
    del qd, qdt
    qdg, qdgt, sdg, qdu, qdut, sdu = gk.grad_pairs(dh, g, u, activation, grad_dtype)
    del dh
    grad_x = k.mm(qdg, sdg, qwgt, swg, grad.dtype)
    grad_w_gate = k.mm(qdgt, sdg, qxt, sx, w_dtype)
    del qdg, qdgt
    grad_x = grad_x + k.mm(qdu, sdu, qwut, swu, grad.dtype)
    grad_w_up = k.mm(qdut, sdu, qxt, sx, w_dtype)
    return grad_x.reshape(*grad.shape[:-1], qwgt.shape[0]), grad_w_gate, grad_w_up, grad_w_down


@torch.library.custom_op("kp::fp8_gated_mlp_train", mutates_args=())
def fp8_gated_mlp_train(x: torch.Tensor, qx: torch.Tensor, qxt: torch.Tensor, sx: torch.Tensor,
                        w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str,
                        fwd_dtype: torch.dtype, grad_dtype: torch.dtype, fast_accum: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check(x, w_gate, w_up, w_down, activation, fwd_dtype, grad_dtype)
    return forward(EMULATED, EMULATED_GATED, x, qx, sx, w_gate, w_up, w_down, activation, fwd_dtype, fast_accum)


@fp8_gated_mlp_train.register_fake
def _(x, qx, qxt, sx, w_gate, w_up, w_down, activation, fwd_dtype, grad_dtype, fast_accum=False):
    m = x.numel() // x.shape[-1]
    f, d, e = w_gate.shape[0], w_gate.shape[1], w_down.shape[0]
    scale = x.new_empty((), dtype=torch.float32)
    return (x.new_empty(*x.shape[:-1], e), x.new_empty(m, f), x.new_empty(m, f),
            x.new_empty(f, padded(m), dtype=fwd_dtype), scale, x.new_empty(d, f, dtype=fwd_dtype),
            x.new_empty(d, f, dtype=fwd_dtype), x.new_empty(f, e, dtype=fwd_dtype), scale.clone(), scale.clone(),
            scale.clone())


@torch.library.custom_op("kp::fp8_gated_mlp_train_backward", mutates_args=())
def fp8_gated_mlp_train_backward(grad: torch.Tensor, g: torch.Tensor, u: torch.Tensor, qxt: torch.Tensor,
                                 sx: torch.Tensor, qht: torch.Tensor, sh: torch.Tensor, qwgt: torch.Tensor,
                                 qwut: torch.Tensor, qwdt: torch.Tensor, swg: torch.Tensor, swu: torch.Tensor,
                                 swd: torch.Tensor, activation: str, grad_dtype: torch.dtype, w_dtype: torch.dtype
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(EMULATED, EMULATED_GATED, grad, g, u, qxt, sx, qht, sh, qwgt, qwut, qwdt, swg, swu, swd,
                    activation, grad_dtype, w_dtype)


@fp8_gated_mlp_train_backward.register_fake
def _(grad, g, u, qxt, sx, qht, sh, qwgt, qwut, qwdt, swg, swu, swd, activation, grad_dtype, w_dtype):
    d, f = qwgt.shape
    e = qwdt.shape[1]
    return (grad.new_empty(*grad.shape[:-1], d), grad.new_empty(f, d, dtype=w_dtype),
            grad.new_empty(f, d, dtype=w_dtype), grad.new_empty(e, f, dtype=w_dtype))


def _setup_context(ctx, inputs, output):
    w_gate, activation, grad_dtype = inputs[4], inputs[7], inputs[9]
    qxt, sx = inputs[2], inputs[3]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2], qxt, sx, *output[3:])
    ctx.args = (activation, grad_dtype, w_gate.dtype)


def _backward(ctx, grad, *unused):
    if grad is None:  # the output took no part in the loss
        return (None,) * 11
    grad_x, grad_wg, grad_wu, grad_wd = torch.ops.kp.fp8_gated_mlp_train_backward(grad, *ctx.saved_tensors, *ctx.args)
    return grad_x, None, None, None, grad_wg, grad_wu, grad_wd, None, None, None, None


fp8_gated_mlp_train.register_autograd(_backward, setup_context=_setup_context)
