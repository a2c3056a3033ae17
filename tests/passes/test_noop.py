"""noop-elimination: what it drops, what it must leave alone, and numerics."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from kp_compiler.passes.cleanup.noop import noop_elimination
from tests.utils import compile_and_collect

aten = torch.ops.aten


def canonical(fn, *inputs):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return make_fx(fn, pre_dispatch=True)(*[mode.from_tensor(t) for t in inputs])


def ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run_pass(fn, *inputs):
    gm = canonical(fn, *inputs)
    result = noop_elimination(gm)
    fresh = [torch.randn_like(t) if t.is_floating_point() else t.clone() for t in inputs]
    torch.testing.assert_close(gm(*[t.clone() for t in fresh]), fn(*[t.clone() for t in fresh]))
    return gm, result


@pytest.mark.parametrize("fn, rule", [
    (lambda x: (x * 1).relu(), "mul-by-one"),
    (lambda x: (1 * x).relu(), "mul-by-one"),  # canonicalization puts the scalar second
    (lambda x: (x / 1).relu(), "div-by-one"),
    (lambda x: (x + 0).relu(), "add-zero"),
    (lambda x: (x - 0).relu(), "sub-zero"),
    (lambda x: x.view(4, 8).relu(), "same-shape-view"),
    (lambda x: x.reshape(4, 8).relu(), "same-shape-view"),
    (lambda x: x.expand(4, 8).relu(), "same-shape-view"),
    (lambda x: x.permute(0, 1).relu(), "identity-permute"),
    (lambda x: x.transpose(1, -1).relu(), "same-dim-transpose"),
    (lambda x: x.t().t().relu(), "double-t"),
    (lambda x: x.to(torch.float32).relu(), "same-dtype-to"),
    (lambda x: torch.nn.functional.dropout(x, 0.0, True).relu(), "inactive-dropout"),
    (lambda x: torch.nn.functional.dropout(x, 0.5, False).relu(), "inactive-dropout"),
])
def test_drops_noop(fn, rule):
    gm, result = run_pass(fn, torch.randn(4, 8))
    assert result == 1
    assert [k.split(" ")[0] for k in result.by_rule if result.by_rule[k]] == [rule]
    assert ops(gm) == [aten.relu.default]


@pytest.mark.parametrize("why, fn, inputs", [
    ("int * 1.0 promotes to float", lambda x: (x * 1.0).abs(), (torch.arange(6).view(2, 3),)),
    ("int + 0.0 promotes to float", lambda x: (x + 0.0).abs(), (torch.arange(4),)),
    ("an expand that broadcasts", lambda x: x.expand(2, 3).abs(), (torch.randn(3),)),
    ("a view that changes the shape", lambda x: x.view(2, 2).abs(), (torch.randn(4),)),
    ("floor division is not a no-op", lambda x: torch.div(x, 1, rounding_mode="floor").abs(), (torch.randn(4),)),
    ("mul by 2", lambda x: (x * 2).abs(), (torch.randn(4),)),
    ("a real permute", lambda x: x.permute(1, 0).abs(), (torch.randn(3, 4),)),
    ("a real transpose", lambda x: x.transpose(0, 1).abs(), (torch.randn(3, 4),)),
    ("active dropout", lambda x: torch.nn.functional.dropout(x, 0.5, True).abs(), (torch.randn(4),)),
    ("a dtype change", lambda x: x.to(torch.float64).abs(), (torch.randn(4),)),
])
def test_leaves_real_work_alone(why, fn, inputs):
    gm = canonical(fn, *inputs)
    before = ops(gm)
    result = noop_elimination(gm)
    assert ops(gm) == before, why
    assert result == 0


def test_mutated_alias_blocks_forwarding():
    def fn(x):
        y = x * 1
        y.add_(1)  # y is a fresh tensor in eager: x must not change
        return x.relu() + y

    x = torch.randn(4)
    gm, result = run_pass(fn, x)
    assert result == 0


def test_mutation_through_a_view_blocks_forwarding():
    def fn(x):
        y = x + 0
        y.view(2, 2).mul_(3)
        return x.relu(), y

    gm, result = run_pass(fn, torch.randn(4))
    assert result == 0


def test_never_returns_an_alias_of_an_input():
    gm = canonical(lambda x: x * 1, torch.randn(4))
    assert noop_elimination(gm) == 0
    gm = canonical(lambda x: x.view(4) * 1, torch.randn(4))
    noop_elimination(gm)
    x = torch.randn(4)
    out = gm(x)
    assert out.data_ptr() != x.data_ptr()


def test_through_the_backend_with_training():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.drop = torch.nn.Dropout(0.0)

        def forward(self, x):
            return self.drop(self.lin(x) * 1).view(x.shape[0], 8).relu()

    model = M()
    x = torch.randn(4, 8, requires_grad=True)
    compiled, out, records = compile_and_collect(model, (x,), lowering="eager", passes=["noop-elimination"])
    assert records[0].passes[0].matches == 3
    ref = model(x)
    torch.testing.assert_close(out, ref)
    gx_ref, = torch.autograd.grad(ref.sum(), x)
    gx, = torch.autograd.grad(compiled(x).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
