"""``moe-dispatch`` on the other common spellings of the expert loop's routing and combine:
``nonzero`` (as a tuple or as ``[n, 2]`` columns) for ``where``, and ``scatter_add`` or an accumulating
``index_put`` for ``index_add`` (each also in place). Outputs and gradients equal eager; look-alikes that
differ in meaning are left alone, with the reason in the report."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.passes.test_moe import D, FF, E, K, PASSES, capture_loops, check_equal, moe_pass  # noqa: F401 (fixture)
from tests.utils import compile_and_collect, filecheck


class Spelled(nn.Module):
    """A SwiGLU expert loop over 3-D parameter slices, routed and summed as ``select`` and ``combine`` say."""

    def __init__(self, select="where", combine="index_add", width=D):
        super().__init__()
        self.select, self.combine, self.width = select, combine, width
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.randn(E, FF, D) * 0.2)
        self.w_up = nn.Parameter(torch.randn(E, FF, D) * 0.2)
        self.w_down = nn.Parameter(torch.randn(E, D, FF) * 0.2)

    def route(self, ids, e):
        if self.select == "nonzero_tuple":
            return (ids == e).nonzero(as_tuple=True)
        if self.select == "nonzero":
            nz = torch.nonzero(ids == e)
            return nz[:, 0], nz[:, 1]
        return torch.where(ids == e)

    def add(self, out, tok, y):
        c = self.combine
        if c == "index_add":
            return out.index_add(0, tok, y)
        if c == "scatter_add":
            return out.scatter_add(0, tok[:, None].expand(-1, self.width), y)
        if c == "scatter_add_":
            return out.scatter_add_(0, tok.unsqueeze(1).expand(-1, self.width), y)
        if c == "index_put":
            return out.index_put((tok,), y, accumulate=True)
        if c == "index_put_":
            return out.index_put_((tok,), y, accumulate=True)
        if c == "index_put_overwrite":  # a look-alike: a token routed to two experts keeps only the last one
            return out.index_put((tok,), y)
        raise ValueError(c)

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = self.route(ids, e)
            xs = x[tok]
            h = F.silu(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e])
            out = self.add(out, tok, F.linear(h, self.w_down[e]) * weights[tok, slot, None])
        return out


CASES = [("nonzero_tuple", "index_add"), ("nonzero", "index_add"), ("where", "scatter_add"),
         ("where", "scatter_add_"), ("where", "index_put"), ("where", "index_put_"), ("nonzero", "scatter_add_"),
         ("nonzero_tuple", "index_put_")]


def assert_one_op_and_equal(model, tmp_path, check_nots: str) -> None:
    """One ``kp::routed_experts`` in the dump, none of ``check_nots`` left, outputs and gradients equal eager."""
    x = torch.randn(10, D)
    _, out, records = compile_and_collect(model, (x,), passes=PASSES, dump_dir=str(tmp_path))
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert moe_pass(records).by_rule == {"gated-silu": 1}, moe_pass(records).notes
    filecheck(
        "CHECK: after moe-dispatch | status ok | matches 1\n"
        "CHECK: kp.routed_experts_train.default({{.*}}'silu') : (f32[10, 16], f32[0])"
        "  # 4 experts, gated silu, from an unrolled loop\n"
        + check_nots,
        (tmp_path / "graph-000" / "02-moe-dispatch.txt").read_text(),
    )
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


@pytest.mark.parametrize("select,combine", CASES)
def test_spelling_rewritten_and_equal(select, combine, tmp_path):
    torch.manual_seed(0)
    assert_one_op_and_equal(Spelled(select, combine), tmp_path, "CHECK-NOT: index_add\nCHECK-NOT: scatter_add\n"
                            "CHECK-NOT: index_put\nCHECK-NOT: nonzero\nCHECK-NOT: aten.where\n")


def test_scatter_add_over_part_of_each_row_is_left_alone_and_said():
    """``scatter_add`` adds only the index's columns: with an index half as wide, the other half of every
    expert's output is dropped, which the routed op would not do. Inference only: torch's own scatter_add
    backward rejects an index narrower than its source (eager fails there too)."""
    torch.manual_seed(0)
    model = Spelled("where", "scatter_add", width=D // 2)
    x = torch.randn(10, D)
    with torch.no_grad():
        _, out, records = compile_and_collect(model, (x,), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert any("left alone" in n and "columns of each row" in n for n in moe_pass(records).notes), \
        moe_pass(records).notes
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[:, D // 2:]) == 0  # what eager does, kept


def test_index_put_without_accumulate_is_not_an_expert_sum():
    torch.manual_seed(0)
    model = Spelled("where", "index_put_overwrite")
    x = torch.randn(10, D)
    _, out, records = compile_and_collect(model, (x,), passes=PASSES)
    assert moe_pass(records).matches == 0
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


class Masked(Spelled):
    """The mask form: ``sel = (ids == e).any(-1)``, ``x[sel]``, the weight ``(weights * (ids == e)).sum(-1)[sel]``,
    summed as ``out[sel] += y`` or an accumulating ``index_put``. ``weight_expert`` shifts the expert whose mask
    picks the weight (a look-alike: the wrong routing weight)."""

    def __init__(self, combine="iadd", weight_expert=0):
        super().__init__(combine=combine)
        self.shift = weight_expert

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            mask = ids == e
            sel = mask.any(dim=-1)
            xs = x[sel]
            w_e = (weights * (ids == (e + self.shift) % E if self.shift else mask)).sum(-1)[sel]
            y = F.linear(F.silu(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e]), self.w_down[e])
            if self.combine == "iadd":
                out[sel] += y * w_e[:, None]
            else:
                out = out.index_put((sel,), y * w_e.unsqueeze(-1), accumulate=True)
        return out


@pytest.mark.parametrize("combine", ["iadd", "index_put"])
def test_mask_form_rewritten_and_equal(combine, tmp_path):
    torch.manual_seed(0)
    assert_one_op_and_equal(Masked(combine), tmp_path,
                            "CHECK-NOT: aten.any\nCHECK-NOT: index_put\nCHECK-NOT: _assert_scalar\n")


def test_mask_form_weighted_by_another_experts_mask_is_left_alone():
    torch.manual_seed(0)
    model = Masked("iadd", weight_expert=1)
    x = torch.randn(10, D)
    _, out, records = compile_and_collect(model, (x,), passes=PASSES)
    assert moe_pass(records).matches == 0
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))
