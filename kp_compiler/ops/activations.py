"""The activations the fused ops take by name, and their derivatives through ATen's backward ops.

``"silu"`` (SwiGLU), ``"gelu"``, ``"gelu_tanh"`` (GEGLU with tanh) and ``"relu"``: the names
``kp::routed_experts``, ``kp::linear_act`` and ``kp::gated_linear`` accept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def act_backward(activation: str, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``grad * act'(z)``: the gradient at the pre-activation ``z``."""
    aten = torch.ops.aten
    if activation == "silu":
        return aten.silu_backward(grad, z)
    if activation in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, z, approximate="tanh" if activation == "gelu_tanh" else "none")
    return aten.threshold_backward(grad, z, 0)
