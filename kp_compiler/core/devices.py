"""What a device can run, as data: kernel choices read these, never the hardware.

``DeviceInfo`` describes a device (kind, CUDA compute capability, ROCm
architecture, name); ``describe(torch.device)`` reads it off the machine,
and tests build one by hand to check every choice without the hardware.
``capabilities(device)`` looks it up in ``TABLE``; ``docs/devices.md`` is
generated from the same table (``python -m kp_compiler.core.devices``)
and a test keeps the two equal.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """A device as kernel choices see it.

    Args:
        kind: ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD through HIP), ``"xpu"``,
            ``"cpu"``, ``"xla"`` or ``"mps"``.
        capability: CUDA compute capability ``(major, minor)``; None elsewhere.
        name: the device's marketing name, for reports.
        arch: ROCm architecture (``"gfx942"`` is MI300); empty elsewhere.
    """

    kind: str
    capability: Optional[tuple] = None
    name: str = ""
    arch: str = ""


@dataclass(frozen=True)
class Capabilities:
    """One row of ``TABLE``.

    Args:
        flex_attention: ``"train"`` (forward and backward), ``"inference"`` or ``"no"``:
            Inductor lowers ``flex_attention`` there.
        fa3: FlashAttention-3 kernels exist for it (the package must still import).
        fp8: FP8 dtypes its matmuls take (``torch._scaled_mm``), empty if none.
        note: what the row means, for the docs.
    """

    flex_attention: str
    fa3: bool
    fp8: tuple
    note: str


# (label, matches(device), capabilities); the first row that matches wins.
TABLE: list[tuple[str, Callable[[DeviceInfo], bool], Capabilities]] = [
    ("CUDA 9.0 (Hopper: H100, H200)", lambda d: d.kind == "cuda" and d.capability == (9, 0),
     Capabilities("train", True, ("float8_e4m3fn", "float8_e5m2"), "FA3 where flash_attn_interface/flash_attn_3 imports")),
    ("CUDA 10.0 and up (Blackwell)", lambda d: d.kind == "cuda" and d.capability is not None and d.capability >= (10, 0),
     Capabilities("train", False, ("float8_e4m3fn", "float8_e5m2"), "FA3 is Hopper-only")),
    ("CUDA 8.9 (Ada: L4, L40S, RTX 4090)", lambda d: d.kind == "cuda" and d.capability == (8, 9),
     Capabilities("train", False, ("float8_e4m3fn", "float8_e5m2"), "first FP8 tensor cores")),
    ("CUDA 8.0 to 8.7 (Ampere: A100, A10)", lambda d: d.kind == "cuda" and d.capability is not None
     and (8, 0) <= d.capability < (8, 9), Capabilities("train", False, (), "no FP8")),
    ("CUDA below 8.0 (T4, V100)", lambda d: d.kind == "cuda",
     Capabilities("no", False, (), "FlexAttention's Triton kernels need 8.0")),
    ("ROCm gfx942 (MI300)", lambda d: d.kind == "rocm" and d.arch.startswith("gfx942"),
     Capabilities("train", False, ("float8_e4m3fnuz", "float8_e5m2fnuz"), "FP8 in the fnuz formats; no FA3")),
    ("ROCm, other architectures", lambda d: d.kind == "rocm",
     Capabilities("train", False, (), "no FP8 assumed; no FA3")),
    ("Intel XPU", lambda d: d.kind == "xpu",
     Capabilities("no", False, (), "not checked here: SDPA only")),
    ("CPU", lambda d: d.kind == "cpu",
     Capabilities("inference", False, (), "Inductor's CPU flex kernel has no backward")),
    ("XLA (TPU; XLA:CPU in tests)", lambda d: d.kind == "xla",
     Capabilities("no", False, (), "SDPA, lowered by XLA; no Triton kernels")),
    ("anything else (MPS, ...)", lambda d: True,
     Capabilities("no", False, (), "SDPA only")),
]


def capabilities(device: DeviceInfo) -> Capabilities:
    """The first row of ``TABLE`` that ``device`` matches."""
    return next(caps for _, matches, caps in TABLE if matches(device))


_SIMULATED: list = []  # a stack of DeviceInfo that ``simulate`` makes every device look like


@contextlib.contextmanager
def simulate(device: DeviceInfo) -> Iterator[DeviceInfo]:
    """Inside the block, ``describe`` returns ``device`` for every device: the CUDA (or any)
    decision path runs on CPU tensors, for tests. The kernels that run are still the tensors' own."""
    _SIMULATED.append(device)
    try:
        yield device
    finally:
        _SIMULATED.pop()


def describe(device: torch.device) -> DeviceInfo:
    """The ``DeviceInfo`` of a real device (queries CUDA only for CUDA devices), or the simulated one."""
    if _SIMULATED:
        return _SIMULATED[-1]
    if device.type == "cuda":
        if torch.version.hip is not None:
            props = torch.cuda.get_device_properties(device)
            return DeviceInfo("rocm", None, props.name, getattr(props, "gcnArchName", ""))
        return DeviceInfo("cuda", torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    return DeviceInfo(device.type)


def flex_attention(device: DeviceInfo, train: bool) -> bool:
    """Inductor lowers ``flex_attention`` here (forward, and backward when ``train``)."""
    flex = capabilities(device).flex_attention
    return flex == "train" or (flex == "inference" and not train)


def fa3(device: DeviceInfo) -> bool:
    """FlashAttention-3 can run: the table allows it and its Python package imports."""
    if not capabilities(device).fa3:
        return False
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn_3"))


def fp8_dtypes(device: DeviceInfo) -> tuple:
    """The FP8 dtypes (``torch.float8_*``) the device's matmuls take, in (forward, gradient) order."""
    return tuple(getattr(torch, name) for name in capabilities(device).fp8)


def devices_markdown() -> str:
    """``docs/devices.md``: the table above, rendered."""
    lines = [
        "# Device matrix",
        "",
        "Generated from `kp_compiler/core/devices.py` (`python -m kp_compiler.core.devices`);",
        "a test fails when this file and the table disagree. Every kernel choice reads this table.",
        "",
        "| device | FlexAttention | FA3 | FP8 matmul dtypes | note |",
        "|---|---|---|---|---|",
    ]
    for label, _, caps in TABLE:
        fp8 = ", ".join(caps.fp8) or "none"
        lines.append(f"| {label} | {caps.flex_attention} | {'yes' if caps.fa3 else 'no'} | {fp8} | {caps.note} |")
    lines += [
        "",
        "What runs where, and what falls back:",
        "",
        "- Lowering: `auto` picks `xla` for tensors on an XLA device and Inductor for everything else;",
        "  `eager` runs the rewritten graph op by op on any device.",
        "- Attention (`passes/attention/kernel_table.py`): SDPA everywhere (`is_causal` when the mask is proven causal;",
        "  torch's dispatcher picks flash, cuDNN, memory-efficient or math). Masks built from index arithmetic",
        "  go to FlexAttention where the FlexAttention column allows it (\"inference\": only without a backward,",
        "  and on the CPU only with `attention_kernel=\"flex\"`), with the Inductor lowering and static shapes;",
        "  elsewhere they stay SDPA with the mask tensor. FA3 is not emitted yet (the column says where it could run).",
        "- FP8 (`passes/fp8/linear.py`) reads the FP8 column; where it is empty the step does not fire. It converts",
        "  only where the size table has a row (CUDA 9.0) or `min_dims` is given (`docs/passes/fp8.md`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "devices.md")
    with open(path, "w") as f:
        f.write(devices_markdown())
    print(f"wrote {os.path.normpath(path)}")
