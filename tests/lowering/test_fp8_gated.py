"""``fp8-linear`` in training graphs with ``fuse_gated=True``: a gated MLP whose three linears convert becomes
``kp::fp8_gated_mlp_train``; without the option (the default) it keeps the separate ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.core.report import collect
from kp_compiler.testing.models import SwiGLU
from tests.utils import filecheck

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = {"emulate": True, "min_dims": [16, 16, 16], "fuse_gated": True}


def run(model, *inputs, tmp_path=None, **fp8):
    """(compiled output, the fp8-linear pass's record, its dump or None); ``fp8``: more FP8 options."""
    options = {"fp8": {**FP8, **fp8}, **({"dump_dir": str(tmp_path)} if tmp_path else {})}
    with collect() as records:
        out = torch.compile(model, backend="kernelpytorch", options=options)(*inputs)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    dump = open(next(tmp_path.glob("graph-*/*-fp8-linear.txt"))).read() if tmp_path else None
    return out, rec, dump


def separate(model, x, act):
    """The per-linear training ops, by hand: what the graph computed before the fusion."""
    def lin(t, w):
        return torch.ops.kp.fp8_linear_train(t, w, None, E4, E5)[0]

    return lin(act(lin(x, model.gate.weight)) * lin(x, model.up.weight), model.down.weight)


def test_swiglu_becomes_one_op_with_the_separate_ops_values(tmp_path):
    """fp32: nothing is rounded to 16 bits between the ops, so the fused op gives the separate ops' values
    exactly, and their gradients."""
    torch.manual_seed(0)
    model, x = SwiGLU(32, 64), torch.randn(2, 40, 32, requires_grad=True)
    out, rec, dump = run(model, x, tmp_path=tmp_path)
    assert rec.by_rule == {"tensorwise": 3, "gated-mlp": 1}
    assert any("1 gated MLP(s) in one op each" in n for n in rec.notes)
    torch._dynamo.reset()
    _, default, _ = run(model, x, fuse_gated=False)
    assert default.by_rule == {"tensorwise": 3}  # the separate ops
    filecheck("CHECK-COUNT-1: kp.fp8_cast_pair.default(%l_x_\n"
              "CHECK: kp.fp8_gated_mlp_train.default(%l_x_{{.*}}'silu', torch.float8_e4m3fn, torch.float8_e5m2, True)\n"
              "CHECK: getitem(%fp8_gated_mlp_train_default, 0){{.*}}# fp8: gated MLP (silu) in one op, the product's "
              "casts fused\n"
              "CHECK-NOT: fp8_linear_shared\nCHECK-NOT: fp8_linear_train\nCHECK-NOT: aten.silu", dump)
    ref_x = x.detach().clone().requires_grad_()
    ref = separate(model, ref_x, F.silu)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    params = list(model.parameters())
    got = torch.autograd.grad(out, [x, *params], grad)
    want = torch.autograd.grad(ref, [ref_x, *params], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert a.abs().max() > 0


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_against_eager(model, d, act_name):
    """bf16 outputs and every gradient against eager bf16 (FP8 error), and against the unfused FP8 graph."""
    torch.manual_seed(1)
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 24, d, dtype=torch.bfloat16, requires_grad=True)
    params = list(model.parameters())
    grad = torch.randn(2, 24, d, dtype=torch.bfloat16)
    out, rec, _ = run(model, x)
    assert rec.by_rule == {"tensorwise": 3, "gated-mlp": 1}, rec.notes
    got = torch.autograd.grad(out, [x, *params], grad)
    ref = model(x)
    want = torch.autograd.grad(ref, [x, *params], grad)
    assert rel(out, ref) < 0.08
    for a, b in zip(got, want):
        assert a is not None and b is not None and a.dtype == torch.bfloat16
        assert rel(a, b) < 0.2  # E5M2 gradients
    return out, got


def test_transformers_llama_mlp_swiglu():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu", mlp_bias=False,
                                      num_attention_heads=2, num_key_value_heads=2)
    check_against_eager(LlamaMLP(config), 32, "silu")


def test_transformers_gemma_mlp_geglu_tanh():
    """Gemma's ``gelu_pytorch_tanh`` GEGLU; the same model with the fusion off stays as close to eager."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    config = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, hidden_activation="gelu_pytorch_tanh",
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    model = GemmaMLP(config)
    out, got = check_against_eager(model, 32, "gelu_tanh")
    torch._dynamo.reset()
    torch.manual_seed(1)
    x = torch.randn(2, 24, 32, dtype=torch.bfloat16, requires_grad=True)
    off, rec, _ = run(model, x, fuse_gated=False)
    assert rec.by_rule == {"tensorwise": 3}
    assert rel(out, off) < 0.05  # one rounding instead of two: close, not equal


class Lookalike(nn.Module):
    """A SwiGLU with one thing that keeps it from the fused op."""

    def __init__(self, kind, d=32, f=64):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(d, f, bias=kind == "bias")
        self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        act = F.relu if self.kind == "relu" else F.silu
        g = self.gate(x)
        h = act(g) * self.up(x)
        out = self.down(h)
        if self.kind == "product read":
            return out, h
        if self.kind == "gate read":
            return out + g.sum(-1, keepdim=True)
        return out


@pytest.mark.parametrize("kind", ["product read", "gate read", "bias", "relu"])
def test_lookalikes_keep_the_separate_ops(kind):
    torch.manual_seed(2)
    model, x = Lookalike(kind), torch.randn(48, 32, requires_grad=True)
    out, rec, _ = run(model, x)
    assert rec.by_rule == {"tensorwise": 3}, kind
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_not_fused_by_default():
    torch.manual_seed(4)
    compiled = torch.compile(SwiGLU(32, 64), backend="kernelpytorch",
                             options={"fp8": {"emulate": True, "min_dims": [16, 16, 16]}})
    with collect() as records:
        compiled(torch.randn(48, 32, requires_grad=True))
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    assert rec.by_rule == {"tensorwise": 3}


def test_inference_graphs_are_not_fused():
    """Under no_grad the linears become kp::fp8_linear with cached weights: nothing to fuse."""
    torch.manual_seed(3)
    with torch.no_grad():
        _, rec, _ = run(SwiGLU(32, 64), torch.randn(48, 32))
    assert rec.by_rule == {"tensorwise": 3}
