"""The elementwise middle of the routed experts' backward, in one pass over the rows.

Between the backward's grouped GEMMs, each row (one token's assignment to one
expert, sorted by expert) needs, from the gate and up pre-activations ``g``,
``u``, the gradient reaching ``h`` before the routing weight ``g_dh = grad @
w_down[e]`` and the row's routing weight ``r``::

    h      = act(g) * u                (ungated: act(u))
    dh     = g_dh * r
    du     = dh * act(g)               (ungated: dh * act'(u))
    dg     = dh * u * act'(g)
    hr     = h * r                     (grad_down[e] = grad_rows^T @ hr)
    dr     = sum(h * g_dh)             (the routing weight's gradient, fp32)

Written as ATen ops this is about ten kernels with fp32 temporaries of the
full ``[rows, f]`` size; ``grads`` does it in one Triton kernel on CUDA
(everything in fp32 registers, ``du``/``dg``/``hr`` stored in the inputs'
dtype), and ``reference`` in ATen ops everywhere else. ``du`` and ``dg`` are
written into caller-given buffers, so the backward can place them side by
side (``[dg | du]``) for one GEMM against the model's ``gate_up`` weight.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .routed_experts import ACTIVATIONS, act_backward

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference(g, u, g_dh, route, activation: str, dg, du, hr) -> torch.Tensor:
    """ATen version of ``grads`` (same outputs, fp32 math); fills ``dg`` (unless None), ``du``, ``hr``."""
    act = ACTIVATIONS[activation]
    route = route.float()[:, None]
    g_dh32 = g_dh.float()
    dh = g_dh32 * route
    if g is not None:
        g32, u32 = g.float(), u.float()
        a = act(g32)
        h = a * u32
        du.copy_(dh * a)
        dg.copy_(act_backward(activation, dh * u32, g32))
    else:
        u32 = u.float()
        h = act(u32)
        du.copy_(act_backward(activation, dh, u32))
    hr.copy_(h * route)
    return (h * g_dh32).sum(-1)


def grads(g, u, g_dh, route, activation: str, dg, du, hr) -> torch.Tensor:
    """Fill ``dg``, ``du``, ``hr`` ``[rows, f]`` and return ``dr [rows]`` (fp32), as the module docstring says.

    ``g`` is None (and ``dg`` unused) for ungated experts. Row-major 2-D views with unit inner stride
    (slices of a wider buffer allowed). The Triton kernel runs on CUDA; ``reference`` elsewhere.
    """
    if not (_HAS_TRITON and (u.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        return reference(g, u, g_dh, route, activation, dg, du, hr)
    from .triton_expert_grads import launch
    return launch(g, u, g_dh, route, activation, dg, du, hr)
