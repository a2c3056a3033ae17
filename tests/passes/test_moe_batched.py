"""``moe-dispatch`` on Hugging Face transformers' batched expert forms (``grouped_mm``, ``batched_mm``)."""

import os

import pytest
import torch

from kp_compiler.core.report import collect
from kp_compiler.testing.hf import build
from tests.utils import filecheck

PASSES = ["noop-elimination", "moe-dispatch"]  # named: on the CPU the default list leaves moe-dispatch out


def run(model, ids, train, dump_dir=None):
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES, "dump_dir": dump_dir})
    with collect() as records:
        out = compiled(ids, labels=ids) if train else compiled(ids)
    return out, records


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_batched_forms_become_one_op_per_layer_and_equal_eager(name, experts, tmp_path):
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


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_training_gradients_reach_the_3d_expert_parameters(experts):
    model, vocab = build("qwen2_moe", experts=experts)
    model.train()
    ids = torch.randint(0, vocab, (2, 12))
    ref = model(ids, labels=ids).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out, records = run(model, ids, train=True)
    out.loss.backward()
    assert sum(p.matches for r in records for p in r.passes if p.name == "moe-dispatch") == 2
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    experts_grads = [n for n in want if "experts" in n]
    assert experts_grads  # gate_up_proj and down_proj of both layers
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


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
