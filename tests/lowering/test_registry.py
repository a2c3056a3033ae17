"""Lowering selection by device and the clear error when torch_xla is missing."""

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from kp_compiler.lowering import registry
from kp_compiler.lowering.xla import XlaUnavailable


def on(device: str):
    return FakeTensor(FakeTensorMode(), torch.empty(2, device="meta"), torch.device(device))


@pytest.mark.parametrize("devices, expected", [
    (["cpu"], "inductor"),
    (["cuda:0", "cuda:0"], "inductor"),
    (["xpu:0"], "inductor"),
    (["xla:0"], "xla"),
    (["cpu", "xla:0"], "xla"),
])
def test_auto_picks_by_device(devices, expected):
    inputs = [on(d) for d in devices] + [3]  # SymInt-like scalars are ignored
    assert registry.select("auto", inputs) == expected


@pytest.mark.parametrize("name", ["inductor", "eager", "xla"])
def test_explicit_choice_wins(name):
    assert registry.select(name, [on("cpu")]) == name


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
