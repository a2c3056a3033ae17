"""What a device can run, as data: kernel choices read these, never the hardware.

``DeviceInfo`` describes a device (kind, compute capability, name);
``describe(torch.device)`` reads it off the machine, and tests build one by
hand to check every choice without the hardware.

| kind   | FlexAttention (Inductor)          | FA3                         |
|--------|-----------------------------------|-----------------------------|
| cuda   | compute capability 8.0 and up     | 9.0, if ``flash_attn_interface`` or ``flash_attn_3`` imports |
| rocm   | yes (Triton)                      | no                          |
| xpu    | no (not checked here)             | no                          |
| cpu    | inference only (no backward)      | no                          |
| xla    | no (XLA lowers SDPA itself)       | no                          |
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """A device as kernel choices see it.

    Args:
        kind: ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD through HIP), ``"xpu"``,
            ``"cpu"``, ``"xla"`` or ``"mps"``.
        capability: CUDA compute capability ``(major, minor)``; None elsewhere.
        name: the device's marketing name, for reports.
    """

    kind: str
    capability: Optional[tuple] = None
    name: str = ""


def describe(device: torch.device) -> DeviceInfo:
    """The ``DeviceInfo`` of a real device (queries CUDA only for CUDA devices)."""
    if device.type == "cuda":
        if torch.version.hip is not None:
            return DeviceInfo("rocm", None, torch.cuda.get_device_name(device))
        return DeviceInfo("cuda", torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    return DeviceInfo(device.type)


def flex_attention(device: DeviceInfo, train: bool) -> bool:
    """Inductor lowers ``flex_attention`` here (forward, and backward when ``train``)."""
    if device.kind == "cuda":
        return device.capability is not None and device.capability >= (8, 0)
    if device.kind == "rocm":
        return True
    return device.kind == "cpu" and not train  # Inductor's CPU flex kernel has no backward


def fa3(device: DeviceInfo) -> bool:
    """FlashAttention-3 can run: Hopper (9.0) and its Python package imports."""
    if device.kind != "cuda" or device.capability != (9, 0):
        return False
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn_3"))
