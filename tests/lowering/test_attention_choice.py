"""The attention kernel table, fed device descriptions instead of hardware."""

import pytest
import torch

from kp_compiler.core import devices as capabilities
from kp_compiler.passes.attention.kernel_table import AttentionCase, choose
from kp_compiler.core.devices import DeviceInfo

H100 = DeviceInfo("cuda", (9, 0), "H100")
A100 = DeviceInfo("cuda", (8, 0), "A100")
T4 = DeviceInfo("cuda", (7, 5), "T4")
MI300 = DeviceInfo("rocm", None, "MI300X")
CPU = DeviceInfo("cpu")
XPU = DeviceInfo("xpu")
XLA = DeviceInfo("xla")


def case(device=H100, mask="mask_mod", **kw):
    base = dict(device=device, dtype=torch.bfloat16, head_dim=128, mask=mask)
    return AttentionCase(**(base | kw))


TABLE = [
    # (case, prefer, kernel, reason contains)
    (case(mask="none"), "auto", "sdpa", "causal"),
    (case(mask="causal"), "flex", "sdpa", "causal"),
    (case(mask="tensor"), "auto", "sdpa", "reads data"),
    (case(), "auto", "flex", "skips"),
    (case(train=True), "auto", "flex", "skips"),
    (case(device=A100), "auto", "flex", "skips"),
    (case(device=MI300, train=True), "auto", "flex", "skips"),
    (case(device=T4), "auto", "sdpa", "no flex_attention on cuda (7, 5)"),
    (case(device=XPU), "auto", "sdpa", "no flex_attention on xpu"),
    (case(device=XLA, lowering="xla"), "flex", "sdpa", "needs the Inductor lowering"),
    (case(lowering="eager"), "auto", "sdpa", "needs the Inductor lowering"),
    (case(dropout=True), "auto", "sdpa", "no dropout"),
    (case(static_shapes=False), "auto", "flex", "skips"),  # block masks per length (ops/block_masks.py)
    (case(dtype=torch.float64), "auto", "sdpa", "does not take torch.float64"),
    (case(head_dim=80), "auto", "sdpa", "head dim 80"),
    (case(head_dim=8), "auto", "sdpa", "head dim 8"),
    (case(device=CPU), "auto", "sdpa", "not measured faster"),
    (case(device=CPU), "flex", "flex", "skips"),
    (case(device=CPU, train=True), "flex", "sdpa", "no flex_attention backward on cpu"),
    (case(), "sdpa", "sdpa", "attention_kernel='sdpa'"),
    (case(reads_data=True, train=True), "auto", "sdpa", "reads a per-row tensor"),
    (case(reads_data=True), "flex", "flex", "skips"),
    (case(reads_data=True, static_shapes=False), "flex", "sdpa", "symbolic"),
]


@pytest.mark.parametrize("row", range(len(TABLE)))
def test_kernel_table(row):
    c, prefer, kernel, why = TABLE[row]
    choice = choose(c, prefer)
    assert choice.kernel == kernel, choice
    assert why in choice.why, choice


def test_fa3_needs_hopper_and_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn_interface" else None)
    assert capabilities.fa3(H100) and not capabilities.fa3(A100) and not capabilities.fa3(MI300)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not capabilities.fa3(H100)


def test_describe_cpu():
    assert capabilities.describe(torch.device("cpu")) == DeviceInfo("cpu")


def test_flex_runs_with_its_own_heuristics_unless_given():
    """No tuned row ships (none beat flex's heuristics in a model step): "auto" passes no kernel_options."""
    for c in (case(head_dim=64, train=True), case(), case(device=A100, train=True)):
        assert choose(c).kernel == "flex" and choose(c).kernel_options is None, c


def test_flex_kernel_options_given_replace_the_table():
    assert choose(case(head_dim=64, train=True), flex_options={}).kernel_options is None  # flex's heuristics
    given = {"BLOCK_M": 64, "BLOCK_N": 64}
    assert choose(case(), flex_options=given).kernel_options == given
    assert choose(case(mask="causal"), flex_options=given).kernel_options is None  # SDPA takes none
