"""The capability table, fed device descriptions rather than hardware."""

import os

import pytest
import torch

from kp_compiler.core import devices as caps
from kp_compiler.core.devices import DeviceInfo

CASES = [
    # device, flex in training, flex in inference, FP8 dtypes, FA3 allowed
    (DeviceInfo("cuda", (9, 0), "H100"), True, True, (torch.float8_e4m3fn, torch.float8_e5m2), True),
    (DeviceInfo("cuda", (10, 0), "B200"), True, True, (torch.float8_e4m3fn, torch.float8_e5m2), False),
    (DeviceInfo("cuda", (8, 9), "L4"), True, True, (torch.float8_e4m3fn, torch.float8_e5m2), False),
    (DeviceInfo("cuda", (8, 6), "A10"), True, True, (), False),
    (DeviceInfo("cuda", (8, 0), "A100"), True, True, (), False),
    (DeviceInfo("cuda", (7, 5), "T4"), False, False, (), False),
    (DeviceInfo("rocm", None, "MI300X", "gfx942:sramecc+:xnack-"), True, True,
     (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz), False),
    (DeviceInfo("rocm", None, "MI250X", "gfx90a"), True, True, (), False),
    (DeviceInfo("xpu"), False, False, (), False),
    (DeviceInfo("cpu"), False, True, (), False),
    (DeviceInfo("xla"), False, False, (), False),
    (DeviceInfo("mps"), False, False, (), False),
]


@pytest.mark.parametrize("row", range(len(CASES)))
def test_capability_rows(row):
    device, flex_train, flex_infer, fp8, fa3 = CASES[row]
    assert caps.flex_attention(device, train=True) is flex_train
    assert caps.flex_attention(device, train=False) is flex_infer
    assert caps.fp8_dtypes(device) == fp8
    assert caps.capabilities(device).fa3 is fa3


def test_docs_devices_md_is_generated_from_the_table():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "devices.md")
    with open(path) as f:
        assert f.read() == caps.devices_markdown(), "run: python -m kp_compiler.core.devices"


def test_every_device_kind_has_a_row():
    labels = [label for label, _, _ in caps.TABLE]
    for kind in ("cuda", "rocm", "xpu", "cpu", "xla"):
        assert any(matches(DeviceInfo(kind, (9, 0) if kind == "cuda" else None)) for _, matches, _ in caps.TABLE[:-1]), kind
    assert labels[-1].startswith("anything else")
