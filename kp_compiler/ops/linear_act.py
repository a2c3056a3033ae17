"""``kp::linear_act`` and ``kp::gated_linear``: a linear and its activation as one op (issue 19).

::

    linear_act(x, w, b, activation)                  = act(x @ w.T + b)
    gated_linear(x, w_gate, w_up, b_gate, b_up, act) = act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)

``x [..., K]``, weights ``[N, K]`` (the model's own parameters, read where
they are: nothing is packed per call), biases ``[N]`` or None, ``activation``
one of ``ops/activations.py``'s names. The gated form is SwiGLU (``"silu"``)
or GEGLU (``"gelu"``, ``"gelu_tanh"``).

Each comes in two variants with one autograd formula:

- ``linear_act`` / ``gated_linear`` return the output only (inference graphs);
  their backward recomputes the pre-activations (one GEMM per weight more);
- ``linear_act_train`` / ``gated_linear_train`` also return the
  pre-activations, which the backward reads instead (training graphs: what
  eager autograd saves, one tensor less for the gated form, whose
  ``act(gate)`` is recomputed, a pointwise op).

The implementation here is ATen (the reference, and the fallback on every
device); the fused kernels register their device keys in ``lowering``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS, act_backward


def _check(op: str, x: torch.Tensor, weights: tuple, biases: tuple, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"kp::{op}: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    n = weights[0].shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape != (n, x.shape[-1]):
            raise ValueError(f"kp::{op}: weights must be [N, K] with K = x's last dim {x.shape[-1]}, "
                             f"all of one shape; got {[tuple(v.shape) for v in weights]}")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"kp::{op}: x is {x.dtype} on {x.device}, a weight {w.dtype} on {w.device}")
    for b in biases:
        if b is not None and (b.shape != (n,) or b.dtype != x.dtype):
            raise ValueError(f"kp::{op}: a bias must be [N] = [{n}] in x's dtype, got {tuple(b.shape)} {b.dtype}")


def reference(x, w_gate, w_up, b_gate, b_up, activation: str) -> tuple:
    """``(out, gate pre-activation or None, up pre-activation)`` in ATen; ``w_gate`` None: ``act(x @ w_up.T + b_up)``."""
    u = F.linear(x, w_up, b_up)
    if w_gate is None:
        return ACTIVATIONS[activation](u), None, u
    g = F.linear(x, w_gate, b_gate)
    return ACTIVATIONS[activation](g) * u, g, u


def _out_shape(x: torch.Tensor, w: torch.Tensor) -> tuple:
    return (*x.shape[:-1], w.shape[0])


# ---- linear + activation -------------------------------------------------------------------------------------

@torch.library.custom_op("kp::linear_act", mutates_args=())
def linear_act(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    _check("linear_act", x, (w,), (b,), activation)
    return reference(x, None, w, None, b, activation)[0]


@linear_act.register_fake
def _(x, w, b, activation):
    return x.new_empty(_out_shape(x, w))


@torch.library.custom_op("kp::linear_act_train", mutates_args=())
def linear_act_train(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                     activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check("linear_act_train", x, (w,), (b,), activation)
    out, _, z = reference(x, None, w, None, b, activation)
    return out, z


@linear_act_train.register_fake
def _(x, w, b, activation):
    return x.new_empty(_out_shape(x, w)), x.new_empty(_out_shape(x, w))


def linear_grads(dz: torch.Tensor, x: torch.Tensor, w: torch.Tensor, needs: tuple) -> tuple:
    """``(dx, dw, db)`` of ``z = x @ w.T + b`` from ``dz``, each None where ``needs`` says it is not wanted."""
    rows, flat = dz.reshape(-1, dz.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = (dz @ w) if needs[0] else None
    dw = (rows.t() @ flat) if needs[1] else None
    db = rows.sum(0) if len(needs) > 2 and needs[2] else None
    return dx, dw, db


def _linear_act_setup(ctx, inputs, output):
    x, w, b, activation = inputs
    ctx.activation, ctx.has_bias = activation, b is not None
    z = output[1] if isinstance(output, tuple) else None
    ctx.save_for_backward(x, w, b, z)


def _linear_act_backward(ctx, grad, grad_z=None):
    x, w, b, z = ctx.saved_tensors
    if z is None:  # the inference variant: recompute the pre-activation
        z = F.linear(x, w, b)
    dz = act_backward(ctx.activation, grad, z)
    if grad_z is not None:
        dz = dz + grad_z
    dx, dw, db = linear_grads(dz, x, w, ctx.needs_input_grad[:3])
    return dx, dw, db if ctx.has_bias else None, None


linear_act.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)
linear_act_train.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


# ---- gated: act(x W_gate) * (x W_up) -----------------------------------------------------------------------------

@torch.library.custom_op("kp::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: Optional[torch.Tensor],
                 b_up: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    _check("gated_linear", x, (w_gate, w_up), (b_gate, b_up), activation)
    return reference(x, w_gate, w_up, b_gate, b_up, activation)[0]


@gated_linear.register_fake
def _(x, w_gate, w_up, b_gate, b_up, activation):
    return x.new_empty(_out_shape(x, w_up))


@torch.library.custom_op("kp::gated_linear_train", mutates_args=())
def gated_linear_train(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: Optional[torch.Tensor],
                       b_up: Optional[torch.Tensor], activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("gated_linear_train", x, (w_gate, w_up), (b_gate, b_up), activation)
    return reference(x, w_gate, w_up, b_gate, b_up, activation)


@gated_linear_train.register_fake
def _(x, w_gate, w_up, b_gate, b_up, activation):
    shape = _out_shape(x, w_up)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _gated_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, activation = inputs
    ctx.activation, ctx.biases = activation, (b_gate is not None, b_up is not None)
    g, u = output[1:] if isinstance(output, tuple) else (None, None)
    ctx.save_for_backward(x, w_gate, w_up, b_gate, b_up, g, u)


def _gated_backward(ctx, grad, grad_g=None, grad_u=None):
    x, w_gate, w_up, b_gate, b_up, g, u = ctx.saved_tensors
    if g is None:  # the inference variant: recompute the pre-activations
        g, u = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
    dg = act_backward(ctx.activation, grad * u, g)
    du = grad * ACTIVATIONS[ctx.activation](g)
    if grad_g is not None:
        dg = dg + grad_g
    if grad_u is not None:
        du = du + grad_u
    need_x, need_wg, need_wu, need_bg, need_bu = ctx.needs_input_grad[:5]
    dxg, dwg, dbg = linear_grads(dg, x, w_gate, (need_x, need_wg, need_bg))
    dxu, dwu, dbu = linear_grads(du, x, w_up, (need_x, need_wu, need_bu))
    dx = dxg + dxu if need_x else None
    return (dx, dwg, dwu, dbg if ctx.biases[0] else None, dbu if ctx.biases[1] else None, None)


gated_linear.register_autograd(_gated_backward, setup_context=_gated_setup)
gated_linear_train.register_autograd(_gated_backward, setup_context=_gated_setup)
