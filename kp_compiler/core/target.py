"""What a graph is compiled for, decided once per graph by the backend and read by every pass.

``Target`` is frozen: the device as the capability table describes it (``core/devices.py``), whether a
backward may run, and which lowering will run the result. Passes read ``context.current().target``
instead of looking at tensors or at the machine; tests build one by hand (``Target(DeviceInfo("cuda",
(9, 0)), training=True)``) to walk any device's decision path on the CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .devices import Capabilities, DeviceInfo, capabilities, describe


@dataclass(frozen=True)
class Target:
    device: DeviceInfo
    training: bool = False  # a backward may run (grad mode on and an input requires grad)
    lowering: str = "inductor"  # "inductor" | "eager" | "xla"

    @classmethod
    def of(cls, example_inputs: Sequence[Any], lowering: str) -> "Target":
        """The target of the graph Dynamo hands over with ``example_inputs`` (Dynamo guards on grad mode)."""
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        device = describe(tensors[0].device) if tensors else DeviceInfo("cpu")
        training = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        return cls(device, training, lowering)

    @property
    def caps(self) -> Capabilities:
        return capabilities(self.device)

    def flex_attention(self) -> bool:
        """Inductor lowers ``flex_attention`` here (with its backward when training)."""
        flex = self.caps.flex_attention
        return flex == "train" or (flex == "inference" and not self.training)

    def fa3(self) -> bool:
        """FlashAttention-3 can run: the table allows it and its Python package imports."""
        return self.caps.fa3 and any(importlib.util.find_spec(m) is not None
                                     for m in ("flash_attn_interface", "flash_attn_3"))

    def fp8_dtypes(self) -> tuple:
        """The FP8 dtypes the device's matmuls take, in (forward, gradient) order; empty if none."""
        return tuple(getattr(torch, name) for name in self.caps.fp8)
