"""Which implementation runs ``kp::routed_experts``: a table over device, dtype and shapes.

| device | dtype | dims | implementation |
|---|---|---|---|
| CUDA 9.0 and up | bf16 | d and f keep 16-byte aligned rows | ``torch._grouped_mm`` (``ops/grouped_experts.py``) |
| anything else | | | the reference loop (``ops/routed_experts.py``) |

Not measured yet (issue 6): the grouped path is wired for CUDA only, where
``torch._grouped_mm`` is the anchors' 179 TFLOP/s baseline; the fused Triton
kernel the issue asks for does not exist yet. The CPU keeps the reference.
"""

from __future__ import annotations

import functools

import torch

from ..ops import grouped_experts, routed_experts
from .capabilities import DeviceInfo, describe


def choose(device: DeviceInfo, dtype: torch.dtype, aligned: bool) -> str:
    """``"grouped_mm"`` or ``"reference"``."""
    if device.kind == "cuda" and device.capability is not None and device.capability >= (9, 0):
        if dtype is torch.bfloat16 and aligned:
            return "grouped_mm"
    return "reference"


_device_info = functools.lru_cache(maxsize=None)(describe)  # per call otherwise: CUDA property queries


def _cuda_impl(x, ids, weights, w_gate, w_up, w_down, activation):
    routed_experts._check(x, ids, weights, w_gate, w_up, w_down, activation)
    impl = choose(_device_info(x.device), x.dtype, grouped_experts.aligned(x, w_up))
    with torch.no_grad():
        if impl == "grouped_mm":
            return grouped_experts.forward(x, ids, weights, w_gate, w_up, w_down, activation)
        return routed_experts.reference(x, ids, weights, w_gate, w_up, w_down, activation)


routed_experts.routed_experts.register_kernel("cuda")(_cuda_impl)
