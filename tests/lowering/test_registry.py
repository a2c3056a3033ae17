"""Lowering selection by device and the clear error when torch_xla is missing."""

import importlib.util

import pytest
import torch

from kp_compiler.lowering import registry
from kp_compiler.lowering.xla import XlaUnavailable


@pytest.mark.parametrize("devices, expected", [
    ({"cpu"}, "inductor"),
    ({"cuda"}, "inductor"),
    ({"xpu"}, "inductor"),
    ({"mps"}, "inductor"),
    ({"xla"}, "xla"),
    ({"cpu", "xla"}, "xla"),
])
def test_auto_picks_by_device(devices, expected):
    assert registry.select("auto", devices) == expected


def test_input_devices_reads_tensors_and_ignores_scalars():
    inputs = [torch.randn(2), torch.empty(1, device="meta"), 3]
    assert registry.input_devices(inputs) == {"cpu", "meta"}


@pytest.mark.parametrize("name", ["inductor", "eager", "xla"])
def test_explicit_choice_wins(name):
    assert registry.select(name, {"cpu"}) == name


def test_xla_without_torch_xla_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_xla" else real(n, *a))
    with pytest.raises(XlaUnavailable, match="needs torch_xla"):
        registry.lower("xla", None, [], "default", {})


def test_xla_error_reaches_the_user(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_xla" else real(n, *a))
    f = torch.compile(torch.nn.Linear(4, 4), backend="kernelpytorch", options={"lowering": "xla"})
    with pytest.raises(Exception, match="needs torch_xla"):
        f(torch.randn(2, 4))


def test_eager_lowering_returns_the_rewritten_graph():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    assert registry.lower("eager", gm, [], "default", {}) is gm
