"""Which lowering runs a graph: ``auto`` decides by the inputs' device."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import eager, inductor, xla

LOWERINGS: dict[str, Callable] = {
    "inductor": inductor.lower,
    "eager": eager.lower,
    "xla": xla.lower,
}


def input_devices(example_inputs: Sequence[Any]) -> set[str]:
    return {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}


def select(requested: str, devices: set[str]) -> str:
    """``requested`` unless it is ``"auto"``: then XLA if any input is on an XLA device, else Inductor.

    ``devices`` holds the inputs' device types (``input_devices``). Inductor
    covers CUDA, ROCm (reported as ``cuda``), XPU, MPS and the CPU.
    """
    if requested != "auto":
        return requested
    if "xla" in devices:
        return "xla"
    return "inductor"


def lower(name: str, gm, example_inputs, mode: str, inductor_config: dict, dump=None):
    """``dump``: the graph's ``GraphDump``, where a lowering writes what it lowered (Inductor: its post-grad
    forward and backward graphs, and the paths of the code it generated)."""
    return LOWERINGS[name](gm, example_inputs, mode, inductor_config, dump)
