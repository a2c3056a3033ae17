"""The torchao float8 backend rows (``bench/backends.py``): conversion wiring and the failure message, with a
stand-in for torchao (it is not a dependency; on the GPU machine it travels as a wheel)."""

import sys
import types

import pytest
import torch
from torch import nn

from bench import backends


def _fake_torchao(monkeypatch, calls):
    float8 = types.ModuleType("torchao.float8")

    class Float8LinearConfig:
        @staticmethod
        def from_recipe_name(name):
            return ("config", name)

    def convert_to_float8_training(model, config=None, module_filter_fn=None):
        picked = [fqn for fqn, m in model.named_modules() if module_filter_fn(m, fqn)]
        calls.append((config, picked))
        return model
    float8.Float8LinearConfig, float8.convert_to_float8_training = Float8LinearConfig, convert_to_float8_training
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_row_converts_linears_with_dims_of_16_then_compiles_with_inductor(monkeypatch, recipe):
    calls = []
    _fake_torchao(monkeypatch, calls)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10), nn.Linear(10, 16))
    (row,) = backends.choose([f"torchao-float8-{recipe}"], None)
    compiled = row.wrap(model)
    assert calls == [(("config", recipe), ["0"])]  # 64 -> 10 and 10 -> 16 are not multiples of 16 both ways
    assert row.backend == "inductor"
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x), model(x))


def test_without_torchao_the_row_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    (row,) = backends.choose(["torchao-float8-tensorwise"], None)
    with pytest.raises(RuntimeError, match="torchao is not importable"):
        row.wrap(nn.Linear(16, 16))
