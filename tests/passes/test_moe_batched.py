"""``moe-dispatch`` on Hugging Face transformers' batched expert forms (``grouped_mm``, ``batched_mm``)."""

import os

import pytest
import torch

from kp_compiler.core.report import collect
from kp_compiler.testing.hf import build
from tests.utils import filecheck
from kp_compiler.testing.compare import assert_same_grads, grads_of

PASSES = ["noop-elimination", "moe-dispatch"]  # named: on the CPU the default list leaves moe-dispatch out


@pytest.fixture(autouse=True)
def rewrite_grouped_mm(monkeypatch):
    """transformers' grouped_mm form is kept in training graphs unless asked (it was measured faster left alone
    there); these tests check the rewrite in both."""
    monkeypatch.setenv("KP_MOE_REWRITE_GROUPED_MM", "1")


def run(model, ids, train, dump_dir=None):
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES, "dump_dir": dump_dir})
    with collect() as records:
        out = compiled(ids, labels=ids) if train else compiled(ids)
    return out, records


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_batched_forms_become_one_op_per_layer_and_equal_eager(name, experts, tmp_path):
    """OLMoE: softmax routing without renormalising; DeepSeek-V3: sigmoid routing with a selection bias,
    scaled and renormalised weights, and a shared expert beside (kept as plain ops)."""
    model, vocab = build(name, experts=experts)
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        out, records = run(model, ids, train=False, dump_dir=str(tmp_path))
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.matches == 2 and moe.by_rule == {"gated-silu-batched": 2}  # both layers
    (graph,) = [d for d in os.listdir(tmp_path) if d.startswith("graph-")]
    dump = open(tmp_path / graph / "02-moe-dispatch.txt").read()
    filecheck("CHECK-COUNT-2: kp.routed_experts.default\nCHECK-NOT: kp.routed_experts\n", dump)
    filecheck("CHECK-NOT: aten.bmm\nCHECK-NOT: grouped_mm\nCHECK-NOT: aten.histc\n", dump)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_training_gradients_reach_the_3d_expert_parameters(name, experts):
    model, vocab = build(name, experts=experts)
    model.train()
    ids = torch.randint(0, vocab, (2, 12))
    ref = model(ids, labels=ids).loss
    ref.backward()
    want = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    out, records = run(model, ids, train=True)
    out.loss.backward()
    assert sum(p.matches for r in records for p in r.passes if p.name == "moe-dispatch") == 2
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    experts_grads = [n for n in want if "experts" in n and want[n] is not None]
    assert experts_grads  # gate_up_proj and down_proj of both layers
    assert_same_grads(grads_of(model.named_parameters()), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("leak", [False, True])
def test_a_form_whose_projection_is_used_elsewhere_is_left_alone(leak):
    """The gated projection also feeds the output: rewriting would drop that use (control: no leak)."""
    from transformers.integrations import moe as hf_moe

    model, vocab = build("mixtral", experts="batched_mm")
    layer = model.model.layers[0].mlp.experts
    original = hf_moe._batched_linear
    seen = []

    def leaky(input, weight, bias=None, is_transposed=False):
        out = original(input, weight, bias, is_transposed)
        seen.append(out)
        return out

    class Leaky(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

        def forward(self, x, top_k_index, top_k_weights):
            out = hf_moe.batched_mm_experts_forward(self.experts, x, top_k_index, top_k_weights)
            return out + 0 * seen[-2].sum() if leak else out  # the first projection's output, used outside

    torch.manual_seed(0)
    x = torch.randn(6, 64)
    weights, idx = torch.topk(torch.softmax(torch.randn(6, 4), -1), 2)
    leak = Leaky(layer)
    hf_moe._batched_linear = leaky
    try:
        with torch.no_grad():
            ref = leak(x, idx, weights)
            compiled = torch.compile(leak, backend="kernelpytorch", options={"passes": PASSES})
            with collect() as records:
                out = compiled(x, idx, weights)
    finally:
        hf_moe._batched_linear = original
    torch.testing.assert_close(out, ref)
    assert sum(p.matches for r in records for p in r.passes if p.name == "moe-dispatch") == (0 if leak else 1)


class SentinelGuarded(torch.nn.Module):
    """transformers 5.17's expert-parallel sentinel guards, written out (CI installs a later transformers):
    grouped form: ``masked_fill(_)`` by ``ge(sorted_ids, bound)`` around each projection and an in-place
    ``clamp_`` of the sorted ids; batched form: ``clamp(ids, 0, E - 1)``. With ``bound=E`` (5.17) every
    guard is a no-op for top-k ids; ``bound=E - 1`` masks expert E-1's rows: a different function."""

    def __init__(self, grouped: bool, bound: int, E=4, d=16, f=8):
        super().__init__()
        self.grouped, self.bound, self.E = grouped, bound, E
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * f, d) / d ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(E, d, f) / f ** 0.5)
        self.router = torch.nn.Linear(d, E, bias=False)

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x), -1), 2)
        T, k = ids.shape
        flat_w, flat = w.reshape(-1), ids.reshape(-1)
        if not self.grouped:
            flat = flat.clamp(0, self.E - 1)
            gu = torch.bmm(self.gate_up[flat], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
            g, u = gu.chunk(2, -1)
            y = torch.bmm(self.down[flat], (torch.nn.functional.silu(g) * u).unsqueeze(-1)).squeeze(-1)
            return (y * flat_w.unsqueeze(-1)).view(T, k, x.shape[-1]).sum(1)
        sorted_ids, perm = torch.sort(flat)
        xs = x[perm // k]
        offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=self.E, min=0, max=self.E - 1), 0, dtype=torch.int32)
        mask = (sorted_ids >= self.bound).unsqueeze(-1)
        sorted_ids.clamp_(max=self.E - 1)
        xs.masked_fill_(mask, 0.0)
        gu = _grouped(xs, self.gate_up.transpose(-2, -1), offs).masked_fill(mask, 0.0)
        g, u = gu.chunk(2, -1)
        y = _grouped(torch.nn.functional.silu(g) * u, self.down.transpose(-2, -1), offs).masked_fill(mask, 0.0)
        y = y * flat_w[perm].unsqueeze(-1)
        inv = torch.empty_like(perm).index_put_((perm,), torch.arange(T * k))
        return y[inv].view(T, k, x.shape[-1]).sum(1)


def _grouped(inp, w_t, offs):
    """``torch._grouped_mm``, what transformers' grouped path calls where it runs (on the CPU too, from torch 2.9)."""
    return torch._grouped_mm(inp, w_t, offs=offs)


@pytest.mark.parametrize("grouped,bound,fires", [(True, 4, True), (True, 3, False), (False, 4, True)])
def test_transformers_5_17_sentinel_guards_are_seen_through_only_when_they_are_no_ops(grouped, bound, fires):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if grouped else torch.float32  # torch._grouped_mm takes bf16 only
    model = SentinelGuarded(grouped, bound).to(dtype)
    x = torch.randn(10, 16, dtype=dtype)
    ref = model(x)
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES})
    with collect() as records:
        out = compiled(x)
    out.sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if grouped else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    assert sum(p.matches for r in records for p in r.passes if p.name == "moe-dispatch") == (1 if fires else 0)
    assert model.gate_up.grad is not None and torch.count_nonzero(model.gate_up.grad) > 0


def test_by_default_the_grouped_mm_form_is_rewritten_for_inference_and_kept_for_training(monkeypatch):
    """``moe_grouped_mm="auto"``: the routed op measured faster in inference and slower in a training step."""
    monkeypatch.delenv("KP_MOE_REWRITE_GROUPED_MM")
    model, vocab = build("mixtral", experts="grouped_mm")
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        out, records = run(model, ids, train=False)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.by_rule == {"gated-silu-batched": 2} and not moe.notes
    torch._dynamo.reset()
    out, records = run(model, ids, train=True)
    out.loss.backward()
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.matches == 0
    assert len(moe.notes) == 2 and "training graph" in moe.notes[0]  # one per layer, saying why
    assert "options['moe_grouped_mm']='rewrite'" in moe.notes[0]
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_the_keep_option_keeps_the_grouped_mm_form_in_inference_too(monkeypatch):
    monkeypatch.delenv("KP_MOE_REWRITE_GROUPED_MM")
    model, vocab = build("mixtral", experts="grouped_mm")
    ids = torch.randint(0, vocab, (2, 12))
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES, "moe_grouped_mm": "keep"})
    with torch.no_grad(), collect() as records:
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.matches == 0 and "'keep'" in moe.notes[0]


def test_the_moe_grouped_mm_option_rewrites_the_form(monkeypatch):
    """``options={"moe_grouped_mm": "rewrite"}``: the rewrite per compile, so a benchmark can put both rows in one
    process (the environment variable applies to every compile)."""
    monkeypatch.delenv("KP_MOE_REWRITE_GROUPED_MM")
    model, vocab = build("mixtral", experts="grouped_mm")
    ids = torch.randint(0, vocab, (2, 12))
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES, "moe_grouped_mm": "rewrite"})
    with torch.no_grad(), collect() as records:
        out = compiled(ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.by_rule == {"gated-silu-batched": 2}


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_experts_whose_ids_are_a_graph_input_are_left_alone_and_say_why(experts):
    """transformers' expert parallelism calls the experts on ids made in another graph (Dynamo breaks the graph
    between them): nothing proves them below E, so the form stays as it is, equal to eager, and the report says
    where the ids come from."""
    model, _ = build("mixtral", experts=experts)
    layer = model.model.layers[0].mlp.experts
    x = torch.randn(10, layer.gate_up_proj.shape[-1])
    ids = torch.randint(0, layer.num_experts, (10, 2))
    weights = torch.rand(10, 2)
    compiled = torch.compile(layer, backend="kernelpytorch", options={"passes": PASSES})
    with torch.no_grad(), collect() as records:
        out = compiled(x, ids, weights)
        ref = layer(x, ids, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (moe,) = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe.matches == 0
    assert any("ids come from an input of this graph" in n for n in moe.notes), moe.notes
