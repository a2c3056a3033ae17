"""``kp::fp8_linear_scaled``: FP8 linear with scales kept across calls (delayed and static scaling).

Each converted linear owns three state rows (``ops/fp8_state.py``), one per
tensor role (``x``, ``w``, ``grad``), laid out ``[scale, events, amax history...]``:

- ``scale``: the dequantization scale the next call uses (0 until set);
- ``events``: how many calls saw a non-finite or zero amax (overflow events);
- the amax history, newest first (``history_len`` entries; none is stored
  for a role whose scale is frozen).

``kp::fp8_scale_update(state, t, dtype, margin, scaling)`` returns the scale to
quantize ``t`` with *now* and updates ``state`` in place (a declared mutation,
so AOTAutograd's functionalization keeps it, and writes it back to the buffer):

- ``scaling="delayed"``: the scale is the stored one (``max(history) / fp8_max
  * 2**margin`` from earlier calls); on the first call, with no history, it
  comes from ``t``'s own amax. Then ``amax(t)`` enters the history and the
  stored scale is recomputed from it.
- ``scaling="frozen"`` (static scaling): the stored, calibrated scale; nothing
  is recorded.
- ``scaling="dynamic"``: ``t``'s own finite amax (static scaling's gradients).

In every case a non-finite or zero ``amax(t)`` is not recorded, the previous
scale stays, and ``events`` goes up by one. The cast saturates, so an inf in
``t`` gives a finite result.

``kp::fp8_linear_scaled(x, w, bias, x_scale, w_scale?, grad_state, recipe,
fwd_dtype, grad_dtype, margin, cache_weight, fast_accum)`` is the GEMM with given scales
(``w_scale=None``: ``w``'s own amax, cached between calls when
``cache_weight``). Its backward op updates ``grad_state`` with the incoming
gradient's amax (E5M2), then runs both backward GEMMs in FP8 with the
forward's scales for ``x`` and ``w``. Delayed and static scaling are
tensorwise.
"""

from __future__ import annotations

from typing import Optional

import torch

from .fp8 import _check, bias_grad, weight_q
from .fp8_quant import EMULATED, Kernels, amax, fp8_max, scale_from_amax

SCALE, EVENTS, HISTORY = 0, 1, 2
RECIPES = ("delayed", "static")
MODES = ("delayed", "frozen", "dynamic")


def update_scale(state: torch.Tensor, t: torch.Tensor, dtype: torch.dtype, margin: float, mode: str) -> torch.Tensor:
    """The scale for ``t`` now; ``state`` (one role's row) updated in place. No host sync."""
    raw = t.detach().abs().float().amax()
    bad = ~torch.isfinite(raw) | (raw == 0)
    state[EVENTS] += bad.float()
    stored = state[SCALE].clone()
    if mode == "frozen":
        return stored
    if mode == "dynamic":
        now = scale_from_amax(amax(t, False), dtype)
        state[SCALE] = torch.where(bad, stored, now)
        return now
    fresh = torch.where(bad, torch.ones_like(raw), scale_from_amax(raw, dtype, margin))
    now = torch.where(stored > 0, stored, fresh)
    history = state[HISTORY:]
    rolled = torch.cat([torch.where(bad, torch.zeros_like(raw), raw).reshape(1), history[:-1]])
    history.copy_(torch.where(bad, history, rolled))
    top = history.amax()
    state[SCALE] = torch.where(top > 0, top / fp8_max(dtype) * 2.0 ** margin, stored)
    return now


@torch.library.custom_op("kp::fp8_scale_update", mutates_args=("state",))
def fp8_scale_update(state: torch.Tensor, t: torch.Tensor, dtype: torch.dtype, margin: float,
                     scaling: str) -> torch.Tensor:
    # (not named "mode": auto_functionalize passes its own "mode" keyword)
    if scaling not in MODES:
        raise ValueError(f"kp::fp8_scale_update: scaling {scaling!r} is not one of {MODES}")
    return update_scale(state, t, dtype, margin, scaling)


@fp8_scale_update.register_fake
def _(state, t, dtype, margin, scaling):
    return state.new_empty(())


def forward(k: Kernels, x, w, bias, sx, sw, fwd_dtype, cache_weight, fast_accum=False):
    x2 = x.reshape(-1, x.shape[-1])
    qx = k.quantize(x2, sx, fwd_dtype)
    if sw is None:
        qw, sw = weight_q(k, w, fwd_dtype, False, cache_weight)
    else:
        qw = k.quantize(w, sw, fwd_dtype)
    return k.mm(qx, sx, qw, sw, x.dtype, bias, fast_accum=fast_accum).reshape(*x.shape[:-1], w.shape[0])


def backward(k: Kernels, grad, x, w, sx, sw, grad_state, recipe, fwd_dtype, grad_dtype, margin):
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    sg = update_scale(grad_state, g2, grad_dtype, margin, "delayed" if recipe == "delayed" else "dynamic")
    if sw is None:
        sw = scale_from_amax(amax(w, False), fwd_dtype)
    grad_x = k.mm(k.quantize(g2, sg, grad_dtype), sg, k.quantize(w.t(), sw, fwd_dtype), sw, x.dtype)
    g2, x2 = k.pad_tokens(g2), k.pad_tokens(x2)
    grad_w = k.mm(k.quantize(g2.t(), sg, grad_dtype), sg, k.quantize(x2.t(), sx, fwd_dtype), sx, w.dtype)
    return grad_x.reshape(x.shape), grad_w


@torch.library.custom_op("kp::fp8_linear_scaled", mutates_args=())
def fp8_linear_scaled(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], x_scale: torch.Tensor,
                      w_scale: Optional[torch.Tensor], grad_state: torch.Tensor, recipe: str,
                      fwd_dtype: torch.dtype, grad_dtype: torch.dtype, margin: float,
                      cache_weight: bool = False, fast_accum: bool = False) -> torch.Tensor:
    _check(x, w, bias, recipe, fwd_dtype, grad_dtype, RECIPES)
    return forward(EMULATED, x, w, bias, x_scale, w_scale, fwd_dtype, cache_weight, fast_accum)


@fp8_linear_scaled.register_fake
def _(x, w, bias, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin, cache_weight=False, fast_accum=False):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("kp::fp8_linear_scaled_backward", mutates_args=("grad_state",))
def fp8_linear_scaled_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor,
                               w_scale: Optional[torch.Tensor], grad_state: torch.Tensor, recipe: str,
                               fwd_dtype: torch.dtype, grad_dtype: torch.dtype,
                               margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(EMULATED, grad, x, w, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin)


@fp8_linear_scaled_backward.register_fake
def _(grad, x, w, x_scale, w_scale, grad_state, recipe, fwd_dtype, grad_dtype, margin):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, bias, sx, sw, grad_state, recipe, fwd_dtype, grad_dtype, margin, _, _ = inputs
    ctx.save_for_backward(x, w, sx, sw)
    # Not saved for backward: the backward updates it, and a second forward's backward
    # (gradient accumulation) must not fail autograd's saved-tensor version check.
    ctx.grad_state = grad_state
    ctx.args = (recipe, fwd_dtype, grad_dtype, margin)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, w, sx, sw = ctx.saved_tensors
    grad_x, grad_w = torch.ops.kp.fp8_linear_scaled_backward(grad, x, w, sx, sw, ctx.grad_state, *ctx.args)
    return (grad_x, grad_w, bias_grad(grad) if ctx.has_bias else None) + (None,) * 9


fp8_linear_scaled.register_autograd(_backward, setup_context=_setup_context)
