"""``moe-dispatch`` on the dense expert form: every expert on every token, masked by scattered routing weights."""

import pytest
import torch

from tests.passes.test_moe import SlicedExperts, check_equal, moe_pass
from tests.utils import compile_and_collect, filecheck

D, FF, E, K = 16, 24, 4, 2
PASSES = ["noop-elimination", "moe-dispatch"]


class DenseExperts(SlicedExperts):
    """SlicedExperts' router and 3-D weights, every expert applied to every token."""

    def __init__(self, gated=True, activation="silu", leak=False):
        super().__init__(activation)
        self.gated, self.leak = gated, leak

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)
        combine = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter(1, ids, weights)
        xe = x.unsqueeze(0).expand(E, -1, -1)
        up = torch.bmm(xe, self.w_up.transpose(1, 2))
        h = self.act(torch.bmm(xe, self.w_gate.transpose(1, 2))) * up if self.gated else self.act(up)
        out = (torch.bmm(h, self.w_down.transpose(1, 2)) * combine.t().unsqueeze(-1)).sum(0)
        return out + 0 * up.sum() if self.leak else out


@pytest.mark.parametrize("gated,act,rule", [(True, "silu", "gated-silu-dense"), (False, "gelu", "gelu-dense")])
def test_dense_form_becomes_one_routed_op_and_equals_eager(gated, act, rule, tmp_path):
    torch.manual_seed(0)
    model = DenseExperts(gated, act)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    assert moe_pass(records).by_rule == {rule: 1}
    dump = open(next(tmp_path.glob("graph-*/02-moe-dispatch.txt"))).read()
    # a training graph (the parameters require grad): the op that keeps its pre-activations
    filecheck("CHECK: kp.routed_experts_train.default\nCHECK-NOT: aten.bmm\nCHECK-NOT: aten.scatter\n", dump)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_dense_form_with_an_outside_use_is_left_alone():
    torch.manual_seed(0)
    model = DenseExperts(leak=True)
    _, out, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0


class EinsumExperts(SlicedExperts):
    """The dense form written with einsum, in other letters and operand orders than the docstring's."""

    def __init__(self, gated=True, activation="silu", combine_eq="bnd,nb->nd"):
        super().__init__(activation)
        self.gated, self.combine_eq = gated, combine_eq

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)
        combine = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter(1, ids, weights)
        up = torch.einsum("nd,bfd->bnf", x, self.w_up)
        h = self.act(torch.einsum("bfd,nd->bnf", self.w_gate, x)) * up if self.gated else self.act(up)
        y = torch.einsum("bnf,bdf->bnd", h, self.w_down)
        return torch.einsum(self.combine_eq, y, combine) if self.combine_eq[0] == "b" else \
            torch.einsum(self.combine_eq, combine, y)


@pytest.mark.parametrize("gated,act,rule,eq", [(True, "silu", "gated-silu-dense", "bnd,nb->nd"),
                                               (False, "gelu", "gelu-dense", "nb,bnd->nd")])
def test_einsum_dense_form_becomes_one_routed_op_and_equals_eager(gated, act, rule, eq, tmp_path):
    torch.manual_seed(0)
    model = EinsumExperts(gated, act, eq)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    assert moe_pass(records).by_rule == {rule: 1}
    dump = open(next(tmp_path.glob("graph-*/02-moe-dispatch.txt"))).read()
    # a training graph (the parameters require grad): the op that keeps its pre-activations
    filecheck("CHECK: kp.routed_experts_train.default\nCHECK-NOT: aten.einsum\nCHECK-NOT: aten.scatter\n", dump)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_an_einsum_that_does_not_sum_over_the_experts_is_left_alone():
    """``bnd,nb->bnd`` keeps the expert axis (a look-alike: no sum over experts, not an MoE combine)."""
    torch.manual_seed(0)
    model = EinsumExperts(combine_eq="bnd,nb->bnd")
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))
