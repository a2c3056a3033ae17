"""What a graph is compiled for, decided once per graph by the backend and read by every pass.

``Target`` is frozen: the device as the capability table describes it (``core/devices.py``), whether a
backward may run, and which lowering will run the result. Passes read ``context.current().target``
instead of looking at tensors or at the machine, and look its device up with ``core/devices.py``'s
``flex_attention``, ``fa3``, ``fp8_dtypes``; tests build one by hand (``Target(DeviceInfo("cuda",
(9, 0)), training=True)``) to walk any device's decision path on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .devices import DeviceInfo, describe


@dataclass(frozen=True)
class Target:
    device: DeviceInfo
    training: bool = False  # a backward may run (grad mode on and an input requires grad)
    lowering: str = "inductor"  # "inductor" | "eager" | "xla"
    # mixed precision: ``torch.autocast`` is on for the device at compile time, or the graph enters it
    autocast: bool = False

    @classmethod
    def of(cls, example_inputs: Sequence[Any], lowering: str, gm=None) -> "Target":
        """The target of the graph Dynamo hands over with ``example_inputs`` (Dynamo guards on grad mode and on
        the autocast state); ``gm``, the Dynamo graph, says whether it enters an autocast region itself."""
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        device = describe(tensors[0].device) if tensors else DeviceInfo("cpu")
        training = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        autocast = _autocast_on(tensors[0].device.type if tensors else "cpu") or _enters_autocast(gm)
        return cls(device, training, lowering, autocast)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def _enters_autocast(gm) -> bool:
    """Dynamo records a ``with torch.autocast(...)`` inside the compiled code as ``_enter_autocast`` nodes."""
    if gm is None:
        return False
    return any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_enter_autocast"
               for n in gm.graph.nodes)
