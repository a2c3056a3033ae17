"""``kp::routed_experts_train``: ``kp::routed_experts`` for training graphs, keeping what its backward recomputed.

``routed_experts_train(x, ids, weights, w_gate, w_up, w_down, activation) -> (out, saved)``: ``out`` is
``routed_experts``'s. ``saved`` holds every assignment's gate and up pre-activations, sorted by expert
(stably; ``[T*k, 2f]``, gate then up, or ``[T*k, f]`` for ungated experts) where the backward runs
``torch._grouped_mm`` (``saves``: CUDA 9.0 and up, bf16, aligned rows); elsewhere it is empty, the forward
is ``routed_experts``'s and the backward recomputes them, as ``routed_experts``'s does. Its backward, ``kp::routed_experts_backward_saved``,
then skips the gate/up GEMM (a third of the forward's work; ``grouped_experts.backward``). The price is
``saved`` held from the forward to the backward, as the eager loop's autograd holds its activations.

``moe-dispatch`` emits it in graphs compiled with a backward, for experts without biases::

    %routed_experts_train = kp.routed_experts_train.default(%x, %ids, %w, [%g], [%u], [%d], 'silu')
    %getitem = getitem(%routed_experts_train, 0)
"""

from __future__ import annotations

import functools
import os

import torch

from . import grouped_experts
from .routed_experts import _check, num_experts, stacked


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device)


# Saving pays where the experts are few and large: the forward then runs torch._grouped_mm instead of the Triton
# kernels, which are faster for many small experts. H200, torch 2.11, latency timing, the op alone per step
# (bench/results, "Session 12"): E=8 top-2 (d=2048, f=5632, T=8192) 9.945 ms saved against 10.483 recomputed;
# E=64 top-8 (f=768, T=4096) 11.428 saved against 9.647. Read from the expert count, a static size (rows per
# expert would be better but are T * k / E, and T is dynamic); between 8 and 64 it is not measured.
SAVE_MAX_EXPERTS = 16
# More experts: the Triton forward writes the pre-activations from its epilogue (``triton_experts.run(save=True)``),
# which should cost one store and save the recompute's GEMM; measured no clear win (H200, 3119f94: E=64 fwd+bwd
# 9.428 against 9.610 ms recomputed, intervals overlapping; decode 8.749 against 8.061): opt-in.
TRITON_SAVE_ENV = "KP_MOE_SAVE_TRITON"


@functools.lru_cache(maxsize=None)
def _env() -> tuple:
    """The variables ``saves`` reads, once per process: the fake (at compile time) and the op (at run time) must
    agree on ``saved``'s shape, so a variable set after a compile must not change it."""
    return tuple(os.environ.get(name, "") for name in ("KP_MOE_BACKWARD", "KP_MOE_KERNEL", TRITON_SAVE_ENV))


def saves(x: torch.Tensor, w_up) -> bool:
    """Whether the forward keeps the pre-activations: at most ``SAVE_MAX_EXPERTS`` experts (any count with
    ``$KP_MOE_SAVE_TRITON=1``), where the backward is ``grouped_experts.backward`` (``lowering/moe.py``'s
    ``choose_backward``) and ``$KP_MOE_BACKWARD`` / ``$KP_MOE_KERNEL`` force no other implementation (each read
    once per process, ``_env``)."""
    backward, kernel, triton_save = _env()
    few = num_experts(w_up) <= SAVE_MAX_EXPERTS or triton_save == "1"
    return (x.device.type == "cuda" and x.dtype is torch.bfloat16 and few and grouped_experts.aligned(x, w_up)
            and backward in ("", "grouped_mm") and kernel in ("", "grouped_mm") and _capability(x.device) >= (9, 0))


def saved_like(x, ids, w_gate, w_up) -> torch.Tensor:
    """An empty tensor shaped as ``saved`` (the fake's, and the pass's record of the op's value): ``[T*k, 2f]``
    (``[T*k, f]`` ungated) where the forward keeps the pre-activations, else ``[0]``."""
    if not saves(x, w_up):
        return x.new_empty(0)
    f = w_up[0].shape[-2]
    return x.new_empty(ids.numel(), 2 * f if w_gate else f)


def forward_impl(x, ids, weights, w_gate, w_up, w_down, activation):
    """The op on every device (``lowering/moe.py`` registers it on the CUDA key directly)."""
    _check(x, ids, weights, w_gate, w_up, w_down, activation)
    with torch.no_grad():
        if saves(x, w_up):
            return grouped_experts.forward(x, ids, weights, w_gate, w_up, w_down, activation, save=True)
    # ``kp::routed_experts``'s own choice (Triton on CUDA, the reference on the CPU), its backward recomputing
    return torch.ops.kp.routed_experts.default(x, ids, weights, w_gate, w_up, w_down, activation), x.new_empty(0)


def backward_impl(grad, x, ids, weights, saved, w_gate, w_up, w_down, activation):
    with torch.no_grad():
        if saved.numel():
            out = grouped_experts.backward(grad.contiguous(), x, ids, weights, w_gate, w_up, w_down, activation,
                                           saved=saved)
        else:  # ``kp::routed_experts_backward``'s own choice
            out = torch.ops.kp.routed_experts_backward.default(grad, x, ids, weights, w_gate, w_up, w_down,
                                                               [], [], [], activation)
    return tuple(out[:5])


@torch.library.custom_op("kp::routed_experts_train", mutates_args=())
def routed_experts_train(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    w_gate: list[torch.Tensor], w_up: list[torch.Tensor], w_down: list[torch.Tensor], activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(x, ids, weights, w_gate, w_up, w_down, activation)


@routed_experts_train.register_fake
def _(x, ids, weights, w_gate, w_up, w_down, activation):
    return x.new_empty(x.shape), saved_like(x, ids, w_gate, w_up)


@torch.library.custom_op("kp::routed_experts_backward_saved", mutates_args=())
def routed_experts_backward_saved(
    grad: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, saved: torch.Tensor,
    w_gate: list[torch.Tensor], w_up: list[torch.Tensor], w_down: list[torch.Tensor], activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weights, grad_gate, grad_up, grad_down)``, the weight gradients stacked ``[E, ...]``
    per role (empty for no gate), as ``kp::routed_experts_backward``'s."""
    return backward_impl(grad, x, ids, weights, saved, w_gate, w_up, w_down, activation)


@routed_experts_backward_saved.register_fake
def _(grad, x, ids, weights, saved, w_gate, w_up, w_down, activation):
    def grads(ws):
        if not ws:
            return x.new_empty(0)
        return x.new_empty(ws[0].shape) if stacked(ws) else x.new_empty(len(ws), *ws[0].shape)
    return x.new_empty(x.shape), weights.new_empty(weights.shape), grads(w_gate), grads(w_up), grads(w_down)


def _setup_context(ctx, inputs, output):
    x, ids, weights, w_gate, w_up, w_down, activation = inputs
    saved = output[1]
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(x, ids, weights, saved, *w_gate, *w_up, *w_down)
    ctx.gates, ctx.experts, ctx.activation = len(w_gate), len(w_up), activation
    ctx.stacked = stacked(w_up)


def _backward(ctx, grad, _grad_saved):
    x, ids, weights, saved, *ws = ctx.saved_tensors
    G, E = ctx.gates, ctx.experts
    gx, gw, gg, gu, gd = torch.ops.kp.routed_experts_backward_saved(
        grad, x, ids, weights, saved, ws[:G], ws[G:G + E], ws[G + E:], ctx.activation)
    if ctx.stacked:
        return gx, None, gw, [gg] if G else [], [gu], [gd], None
    return gx, None, gw, list(gg.unbind(0)) if G else [], list(gu.unbind(0)), list(gd.unbind(0)), None


routed_experts_train.register_autograd(_backward, setup_context=_setup_context)
