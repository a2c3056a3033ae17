"""The peer backend rows (``bench/backends.py``): torchao's float8 training and Liger's fused linear
cross-entropy, wired with stand-ins for the libraries (neither is a dependency; on the GPU machine they travel
as wheels), and the message where one is missing."""

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


def test_the_liger_row_sets_the_cases_loss_and_compiles_with_inductor(monkeypatch):
    from bench.cases.loss import LossOnly
    calls = []

    class FusedLCE:
        def __call__(self, weight, hidden, target):
            calls.append((tuple(weight.shape), tuple(hidden.shape), target.tolist()))
            return torch.nn.functional.cross_entropy(hidden @ weight.t(), target)
    liger = types.ModuleType("liger_kernel.transformers")
    liger.LigerFusedLinearCrossEntropyLoss = FusedLCE
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger)

    class Tiny(nn.Module):  # what LossOnly reads of a transformers causal LM
        def __init__(self):
            super().__init__()
            self.embed, self.lm_head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
            self.model = self

        def forward(self, input_ids, labels=None):
            return types.SimpleNamespace(last_hidden_state=self.embed(input_ids))

    model = LossOnly(Tiny())
    (row,) = backends.choose(["liger"], None)
    compiled = row.wrap(model)
    ids = torch.tensor([[1, 2, 3]])
    loss = compiled(ids, ids)
    assert calls and calls[-1] == ((20, 8), (3, 8), [2, 3, -100])  # labels shifted, the last one ignored
    assert torch.isfinite(loss)


def test_the_liger_row_needs_a_case_with_a_liger_path():
    (row,) = backends.choose(["liger"], None)
    with pytest.raises(RuntimeError, match="no Liger path"):
        row.wrap(nn.Linear(4, 4))
