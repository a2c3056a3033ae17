"""``moe-dispatch``: unrolled expert loops onto ``kp::routed_experts``; look-alikes untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.testing.models import LoopMoE, TinyMoEGPT
from kp_compiler.core.report import collect
from tests.utils import compile_and_collect, filecheck
from kp_compiler.testing.compare import assert_same_grads, grads_of

D, FF, E, K = 16, 24, 4, 2
PASSES = ["noop-elimination", "moe-dispatch"]
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}


@pytest.fixture(autouse=True)
def capture_loops():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


class SlicedExperts(nn.Module):
    """Experts as slices of 3-D parameters; top-k weights not renormalized; activation chosen."""

    def __init__(self, activation="silu", experts=E, loop=None):
        super().__init__()
        self.act, self.loop = ACTS[activation], loop or experts
        self.router = nn.Linear(D, experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(experts, FF, D) * 0.2)
        self.w_up = nn.Parameter(torch.randn(experts, FF, D) * 0.2)
        self.w_down = nn.Parameter(torch.randn(experts, D, FF) * 0.2)

    def route(self, x):
        return torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)

    def forward(self, x):
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.loop):
            tok, slot = torch.where(ids == e)
            xs = x[tok]
            h = self.act(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e])
            out = out.index_add(0, tok, F.linear(h, self.w_down[e]) * weights[tok, slot, None])
        return out


class UngatedExperts(SlicedExperts):
    def forward(self, x):
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.loop):
            tok, slot = torch.where(ids == e)
            h = self.act(F.linear(x[tok], self.w_up[e]))
            out = out.index_add(0, tok, F.linear(h, self.w_down[e]) * weights[tok, slot, None])
        return out


def scatter_rows(x):
    idx = torch.tensor([0, 2, 2, 5])
    return torch.zeros_like(x).index_add(0, idx, x[:4] * 2)


def check_equal(model, x, records_passes=PASSES):
    """Forward and gradients (input and parameters) equal eager on two fresh inputs."""
    torch.manual_seed(0)
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": records_passes, "strict": True})
    for _ in range(2):
        x = torch.randn_like(x).requires_grad_()
        ref_x = x.detach().clone().requires_grad_()
        out, ref = compiled(x), model(ref_x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        params = [p for p in model.parameters() if p.requires_grad]
        got = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
        want = torch.autograd.grad(ref, [ref_x, *params], grad, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def moe_pass(records):
    (rec,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    return rec


@pytest.mark.parametrize("activation", sorted(ACTS))
def test_sliced_experts_rewritten_and_equal(activation):
    torch.manual_seed(0)
    model = SlicedExperts(activation)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).by_rule == {f"gated-{activation}": 1}
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_ungated_experts_rewritten_and_equal(activation):
    torch.manual_seed(0)
    model = UngatedExperts(activation)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).by_rule == {activation: 1}
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_module_list_swiglu_loop_dump(tmp_path):
    torch.manual_seed(0)
    model = LoopMoE(D, FF, E, K)
    x = torch.randn(2, 5, D)
    _, out, records = compile_and_collect(model, (x,), passes=PASSES, dump_dir=str(tmp_path))
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert moe_pass(records).matches == 1
    text = (tmp_path / "graph-000" / "02-moe-dispatch.txt").read_text()
    filecheck(
        "CHECK: after moe-dispatch | status ok | matches 1\n"
        "CHECK: kp.routed_experts_train.default(%reshape, %getitem_1, %div, "
        "[%l_self_modules_experts_modules_0_modules_gate_parameters_weight_, {{.*}}], 'silu') : (f32[10, 16], f32[0])"
        "  # 4 experts, gated silu, from an unrolled loop\n"
        "CHECK-NOT: index_add\nCHECK-NOT: aten.where\nCHECK-NOT: _assert_scalar\n",
        text,
    )
    torch._dynamo.reset()
    check_equal(model, x)


def test_moe_transformer_end_to_end():
    torch.manual_seed(0)
    model = TinyMoEGPT(vocab=64, d=D, heads=2, layers=2, max_len=16)
    idx = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"passes": ["noop-elimination", "attention-to-sdpa", "moe-dispatch"]})
    out, ref = compiled(idx), model(idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    got = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    ref.square().mean().backward()
    assert_same_grads(got, grads_of(model.named_parameters()), rtol=1e-4, atol=1e-6)


class BiasedExperts(SlicedExperts):
    """Experts with biases on all three linears (slices of 2-D parameters)."""

    def __init__(self):
        super().__init__()
        self.b_gate, self.b_up = (nn.Parameter(torch.randn(E, FF) * 0.1) for _ in range(2))
        self.b_down = nn.Parameter(torch.randn(E, D) * 0.1)

    def forward(self, x):
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.loop):
            tok, slot = torch.where(ids == e)
            xs = x[tok]
            h = F.silu(F.linear(xs, self.w_gate[e], self.b_gate[e])) * F.linear(xs, self.w_up[e], self.b_up[e])
            out = out.index_add(0, tok, F.linear(h, self.w_down[e], self.b_down[e]) * weights[tok, slot, None])
        return out


class BiasedMLPs(nn.Module):
    """GELU experts as nn.Linear(bias=True) modules, as in Switch-style MoE layers."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D)) for _ in range(E))

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), K, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out = out.index_add(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out


@pytest.mark.parametrize("model,rule", [(BiasedExperts(), "gated-silu-biased"), (BiasedMLPs(), "gelu-biased")],
                         ids=["gated-sliced", "ungated-modules"])
def test_biased_experts_rewritten_and_equal(model, rule, tmp_path):
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    assert moe_pass(records).by_rule == {rule: 1}
    dump = open(next(tmp_path.glob("graph-*/02-moe-dispatch.txt"))).read()
    filecheck("CHECK: kp.routed_experts_biased.default\nCHECK-NOT: aten.index_add\n", dump)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


class PartlyBiased(SlicedExperts):
    """Only expert 0's down projection has a bias: not one form for every expert."""

    def __init__(self):
        super().__init__()
        self.b0 = nn.Parameter(torch.randn(D) * 0.1)

    def forward(self, x):
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.loop):
            tok, slot = torch.where(ids == e)
            xs = x[tok]
            h = F.silu(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e])
            y = F.linear(h, self.w_down[e], self.b0 if e == 0 else None)
            out = out.index_add(0, tok, y * weights[tok, slot, None])
        return out


@pytest.mark.parametrize("model,why", [
    (SlicedExperts(loop=E - 1), f"not topk indices over {E - 1} experts"),  # one expert never looped: eager drops its tokens
    (PartlyBiased(), "only some experts have a bias"),  # one expert's linear has a bias, the others have none
], ids=["missing-expert", "partly-biased"])
def test_look_alikes_untouched(model, why):
    _, out, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert any("left alone" in n and why in n for n in moe_pass(records).notes), moe_pass(records).notes
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_plain_index_add_untouched():
    x = torch.randn(6, D)
    _, out, records = compile_and_collect(scatter_rows, (x,), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert moe_pass(records).notes == []  # not an expert loop at all: nothing to explain
    torch.testing.assert_close(out, scatter_rows(x))


class DeepSeekStyle(nn.Module):
    """Sigmoid routing with a selection bias, group-limited top-k, and a gated shared expert beside."""

    def __init__(self, groups=2, top_groups=1):
        super().__init__()
        self.groups, self.top_groups = groups, top_groups
        self.router = nn.Linear(D, E, bias=False)
        self.correction = nn.Parameter(torch.randn(E) * 0.1, requires_grad=False)
        self.experts = nn.ModuleList(nn.ModuleDict({
            "gate": nn.Linear(D, FF, bias=False), "up": nn.Linear(D, FF, bias=False),
            "down": nn.Linear(FF, D, bias=False)}) for _ in range(E))
        self.shared = nn.ModuleDict({"gate": nn.Linear(D, FF, bias=False), "up": nn.Linear(D, FF, bias=False),
                                     "down": nn.Linear(FF, D, bias=False), "scale": nn.Linear(D, 1, bias=False)})

    def forward(self, x):
        scores = torch.sigmoid(self.router(x))
        biased = scores + self.correction
        group_scores = biased.view(-1, self.groups, E // self.groups).amax(-1)
        keep_groups = torch.topk(group_scores, self.top_groups, dim=-1)[1]
        mask = torch.zeros_like(group_scores).scatter(1, keep_groups, 1.0)
        mask = mask.repeat_interleave(E // self.groups, dim=-1)
        ids = torch.topk(biased.masked_fill(mask == 0, float("-inf")), K, dim=-1)[1]
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            xs = x[tok]
            h = F.silu(ex["gate"](xs)) * ex["up"](xs)
            out = out.index_add(0, tok, ex["down"](h) * weights[tok, slot, None])
        s = self.shared
        shared = s["down"](F.silu(s["gate"](x)) * s["up"](x)) * torch.sigmoid(s["scale"](x))
        return out + shared


def test_deepseek_style_routing_with_a_shared_expert():
    torch.manual_seed(0)
    model = DeepSeekStyle()
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).by_rule == {"gated-silu": 1}
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_default_passes_leave_moe_dispatch_out_on_the_cpu_and_say_why():
    import kp_compiler

    assert "moe-dispatch" in kp_compiler.default_passes()
    model = LoopMoE(D, FF, E, K)
    _, out, records = compile_and_collect(model, (torch.randn(10, D),))
    (rec,) = records
    assert not [p for p in rec.passes if p.name == "moe-dispatch"]
    # (fp8-linear is listed too, as not applicable without options["fp8"])
    (moe,) = [s for s in rec.skipped if s["pass"] == "moe-dispatch"]
    assert "no fused routed-experts kernel on cpu" in moe["reason"]
    report = str(kp_compiler.explain(model, torch.randn(10, D)))
    assert "left out moe-dispatch: no fused routed-experts kernel on cpu" in report


def test_the_left_out_note_appears_only_where_the_graph_routes_tokens():
    """Issue 14: explain said "left out moe-dispatch" for every model, experts or not."""
    import kp_compiler

    report = str(kp_compiler.explain(torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU()), torch.randn(4, D)))
    assert "moe-dispatch" not in report


class SwiGLU(nn.Module):
    """transformers 4's ``MixtralBlockSparseTop2MLP``: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralV4(nn.Module):
    """transformers 4's ``MixtralSparseMoeBlock.forward`` (also Qwen2-MoE's and others' before v5): the
    experts found by ``where(one_hot(ids, E).permute(2, 1, 0)[e])`` (slot first, then token), rows gathered
    as ``x[None, top_x].reshape(-1, d)``, summed in place into ``zeros((T, d))`` with ``index_add_``."""

    def __init__(self, loop=E, classes=E):
        super().__init__()
        self.loop, self.classes = loop, classes
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, hidden_states):
        T, d = hidden_states.shape
        routing_weights = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((T, d), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.classes).permute(2, 1, 0)
        for expert_idx in range(self.loop):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, d)
            current_hidden = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current_hidden.to(hidden_states.dtype))
        return final


def test_transformers4_one_hot_dispatch_rewritten_and_equal(tmp_path):
    torch.manual_seed(0)
    model = MixtralV4()
    _, out, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    assert moe_pass(records).by_rule == {"gated-silu": 1}
    filecheck(
        "CHECK: after moe-dispatch | status ok | matches 1\n"
        "CHECK: kp.routed_experts_train.default(%l_hidden_states_, %getitem_1, %to, "
        "[%l_self_modules_experts_modules_0_modules_w1_parameters_weight_, {{.*}}], 'silu') : (f32[10, 16], f32[0])"
        "  # 4 experts, gated silu, from an unrolled loop\n"
        "CHECK-NOT: one_hot\nCHECK-NOT: index_add_\nCHECK-NOT: aten.where\n",
        (tmp_path / "graph-000" / "02-moe-dispatch.txt").read_text(),
    )
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


@pytest.mark.parametrize("model,why", [
    (MixtralV4(loop=E - 1), f"one_hot over {E} classes, the loop covers {E - 1} experts"),
    (MixtralV4(classes=E + 1), f"one_hot over {E + 1} classes, the loop covers {E} experts"),
], ids=["missing-expert", "one-hot-over-more-classes"])
def test_transformers4_look_alikes_untouched(model, why):
    """A loop that skips an expert drops its tokens (as eager does); a one_hot over more classes than the loop
    covers is not proven to route every token to a looped expert, so it is left alone too. The report names
    the link that failed."""
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert any("left alone" in n and why in n for n in moe_pass(records).notes), moe_pass(records).notes
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


class Qwen2MoeV4(MixtralV4):
    """transformers 4's ``Qwen2MoeSparseMoeBlock``: the same loop with a shared expert beside it, gated by a
    sigmoid of its own linear, added after the loop (the shared expert stays as plain ops)."""

    def __init__(self):
        super().__init__()
        self.shared_expert = SwiGLU()
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states):
        routed = super().forward(hidden_states)
        shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return routed + shared


def test_transformers4_shared_expert_beside_the_loop(tmp_path):
    torch.manual_seed(0)
    model = Qwen2MoeV4()
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    assert moe_pass(records).by_rule == {"gated-silu": 1}
    filecheck("CHECK: %routed_experts_train_default = kp.routed_experts_train.default(%l_hidden_states_\n"
              "CHECK: %[[OUT:getitem_[0-9]+]] = _operator.getitem(%routed_experts_train_default, 0)\n"
              "CHECK: aten.sigmoid.default\n"
              "CHECK: aten.add.Tensor(%[[OUT]], \n",
              (tmp_path / "graph-000" / "02-moe-dispatch.txt").read_text())
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


class MatmulExperts(nn.Module):
    """Experts as slices of 3-D parameters with biases, GELU, written with ``@`` and ``.T`` (no ``F.linear``)."""

    def __init__(self, extra_term=False):
        super().__init__()
        self.extra_term = extra_term
        self.router = nn.Linear(D, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, FF, D) * 0.2)
        self.b_up = nn.Parameter(torch.randn(E, FF) * 0.1)
        self.w_down = nn.Parameter(torch.randn(E, D, FF) * 0.2)
        self.b_down = nn.Parameter(torch.randn(E, D) * 0.1)

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), -1), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            xs = x[tok]
            # a per-row term is not a bias: x @ w.T + t is then not a linear
            up = xs @ self.w_up[e].T + (xs.sum(-1, keepdim=True) if self.extra_term else self.b_up[e])
            h = F.gelu(up)
            out.index_add_(0, tok, (h @ self.w_down[e].t() + self.b_down[e]) * weights[tok, slot, None])
        return out


def test_matmul_spelled_biased_gelu_experts_rewritten_and_equal():
    torch.manual_seed(0)
    model = MatmulExperts()
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).by_rule == {"gelu-biased": 1}
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_matmul_plus_a_per_row_term_is_not_a_linear():
    torch.manual_seed(0)
    model = MatmulExperts(extra_term=True)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


class DeepSeekV3V4(nn.Module):
    """transformers 4's DeepSeek-V3 ``moe``: ``where(one_hot(ids, E).permute(2, 0, 1)[e])`` (token first),
    ``weights[tok, slot].unsqueeze(-1)``, in place into ``zeros_like`` (its ``if numel() > 0`` guard is left
    out: a data-dependent branch breaks the graph). ``wide_sum``: the sum kept in float64 as that code keeps
    it in the routing weights' dtype, which the op does not do, so that spelling is left alone."""

    def __init__(self, wide_sum=False):
        super().__init__()
        self.wide_sum = wide_sum
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, hidden_states):
        topk_weights, topk_indices = torch.topk(torch.sigmoid(self.gate(hidden_states)), K, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True) * 2.5
        final = torch.zeros_like(hidden_states, dtype=torch.float64 if self.wide_sum else hidden_states.dtype)
        expert_mask = F.one_hot(topk_indices, num_classes=E).permute(2, 0, 1)
        for expert_idx in range(E):
            token_indices, weight_indices = torch.where(expert_mask[expert_idx])
            expert_weights = topk_weights[token_indices, weight_indices]
            out = self.experts[expert_idx](hidden_states[token_indices]) * expert_weights.unsqueeze(-1)
            final.index_add_(0, token_indices, out.to(final.dtype))
        return final.type(hidden_states.dtype)


def test_transformers4_deepseek_v3_loop_rewritten_and_equal():
    torch.manual_seed(0)
    model = DeepSeekV3V4()
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).by_rule == {"gated-silu": 1}
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_a_sum_kept_in_a_wider_dtype_is_left_alone_and_said():
    torch.manual_seed(0)
    model = DeepSeekV3V4(wide_sum=True)
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert any("cast to ['torch.float64'] and summed there" in n for n in moe_pass(records).notes), \
        moe_pass(records).notes


class WideRoutingWeights(nn.Module):
    """Sigmoid routing computed in float64 (a float32 model; in bf16 models the router runs in float32), each
    step's product cast back to the tokens' dtype: the routed op takes weights in x's dtype, so this is left
    alone and the report names the routing weights' dtype."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False).double()
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, x):
        w, ids = torch.topk(torch.sigmoid(self.gate(x.double())), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, (self.experts[e](x[tok]) * w[tok, slot, None]).to(x.dtype))
        return out


def test_routing_weights_in_a_wider_dtype_are_left_alone_and_said():
    torch.manual_seed(0)
    model = WideRoutingWeights()
    _, _, records = compile_and_collect(model, (torch.randn(10, D),), passes=PASSES)
    assert moe_pass(records).matches == 0
    assert any("routing weights are torch.float64, the tokens torch.float32" in n for n in moe_pass(records).notes)
    torch._dynamo.reset()
    check_equal(model, torch.randn(10, D))


def test_expert_loop_under_autocast_is_left_alone_and_says_why():
    """``kp::routed_experts`` has no autocast rule: under autocast it would compute in fp32 where eager computes
    the linears in bf16, so the pass leaves the loop alone, says why, and outputs and gradients equal eager's."""
    torch.manual_seed(0)
    model = LoopMoE(D, 24, E, 2)
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES})
    x = torch.randn(10, D)
    got_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with collect() as records:
            got = compiled(got_x)
        ref = model(ref_x)
    rec = moe_pass(records)
    assert rec.matches == 0
    assert any("torch.autocast is on" in n for n in rec.notes), rec.notes
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    got.float().square().mean().backward()
    got_grads = {**grads_of(model.named_parameters()), "x": got_x.grad}
    model.zero_grad(set_to_none=True)
    ref.float().square().mean().backward()
    assert_same_grads(got_grads, {**grads_of(model.named_parameters()), "x": ref_x.grad}, rtol=2e-2, atol=2e-2)
