"""The gated activation's FP8 casts, as one definition (the emulation) the Triton kernels must match.

A SwiGLU/GEGLU MLP in FP8 casts the activation ``h = act(g) * u`` for the
down projection, and in the backward the gradients ``dg = dh * u * act'(g)``
and ``du = dh * act(g)`` for the gate and up projections. Cast separately,
each of these is written in bf16, read for its amax and read again for the
cast. Here they are computed from ``g``, ``u`` (and ``dh``) in fp32 and cast
straight to FP8, tensorwise, never stored in 16 bits:

- ``gated_pair(g, u, activation, dtype) -> (q(h) [M, F], q(h).T [F, Mp], sh)``;
- ``gated_grad_pairs(dh, g, u, activation, dtype) -> (q(dg), q(dg).T, sdg,
  q(du), q(du).T, sdu)``.

``g``, ``u`` and ``dh`` are 2-D ``[M, F]``. ``Mp`` is ``M`` padded to a
multiple of 16 with zero columns (``fp8_quant.quantize_pair``). The values
differ from casting the bf16 ``h`` (or ``dg``, ``du``) that eager computes
only where rounding to bf16 first would have moved a value across an FP8
rounding boundary: one rounding instead of two.
"""

from __future__ import annotations

import torch

from .activations import ACTIVATIONS, act_backward
from .fp8_quant import quantize_pair

GATED = ("silu", "gelu", "gelu_tanh")


def check_activation(activation: str) -> None:
    if activation not in GATED:
        raise ValueError(f"fp8 gated MLP: activation must be one of {GATED}, got {activation!r}")


def gated(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(g) * u`` in fp32."""
    return ACTIVATIONS[activation](g.float()) * u.float()


def gated_grads(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str):
    """``(dg, du)`` in fp32: the gradients of ``act(g) * u`` at ``g`` and ``u``."""
    gf, uf, df = g.float(), u.float(), dh.float()
    return act_backward(activation, df * uf, gf), df * ACTIVATIONS[activation](gf)


def gated_pair(g: torch.Tensor, u: torch.Tensor, activation: str, dtype: torch.dtype):
    """``(q(h), q(h).T, sh)`` of ``h = act(g) * u``, one tensorwise scale."""
    check_activation(activation)
    return quantize_pair(gated(g, u, activation), dtype)


def gated_grad_pairs(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, dtype: torch.dtype):
    """``(q(dg), q(dg).T, sdg, q(du), q(du).T, sdu)``, each gradient with its own tensorwise scale."""
    check_activation(activation)
    dg, du = gated_grads(dh, g, u, activation)
    return (*quantize_pair(dg, dtype), *quantize_pair(du, dtype))
