"""``options["fp8"]["casts"] = "inductor"`` (the default): the FP8 training ops handed to Inductor as their ATen
bodies (``ops/fp8_traced.py``), so Inductor generates the casts; values equal to the ops' own kernels
(``casts="ops"``)."""

import pytest
import torch
from torch import fx, nn

from kp_compiler.core.report import collect
from kp_compiler.ops import fp8_traced
from kp_compiler.testing.models import SwiGLU
from tests.utils import filecheck

FP8 = {"emulate": True, "min_dims": [16, 16, 16]}
# torch 2.9's CPU Inductor crashed the process (SIGSEGV) on the fp32 graphs below: the backend decomposes on CUDA
# only (fp8_traced.DEVICES), and these tests ask for the CPU where its Inductor compiles them.
OLD_CPU_INDUCTOR = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.fixture(autouse=True)
def decompose_on_the_cpu(monkeypatch):
    if OLD_CPU_INDUCTOR:
        pytest.skip("torch 2.9's CPU Inductor crashes on these graphs; the decomposition runs on CUDA only")
    monkeypatch.setattr(fp8_traced, "DEVICES", ("cuda", "cpu"))


def train_step(model, x, casts, **options):
    """(output, grads of x and every parameter, fp8-linear record), compiled fresh, fp8 casts as given."""
    torch._dynamo.reset()
    x = x.detach().clone().requires_grad_()
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"fp8": {**FP8, "casts": casts}, "strict": True, **options})
    with collect() as records:
        out = compiled(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    grads = torch.autograd.grad(out, [x, *model.parameters()], grad)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    return out, grads, rec


def test_swiglu_in_fp32_equals_the_ops_kernels(tmp_path):
    """fp32 on the CPU: the ops' emulation and the traced bodies (``torch._scaled_mm``, which applies the scales
    after the product) agree to fp32 rounding, and the lowered graphs hold ``_scaled_mm`` and the casts as ATen
    ops, no FP8 op of kernelpytorch."""
    torch.manual_seed(0)
    model, x = SwiGLU(32, 64), torch.randn(2, 40, 32)
    ops_out, ops_grads, rec = train_step(model, x, "ops")
    assert not any("options['fp8']['casts']" in n for n in rec.notes)
    out, grads, rec = train_step(model, x, "inductor", dump_dir=str(tmp_path))
    assert rec.by_rule == {"tensorwise": 3}
    assert any("options['fp8']['casts']='inductor'" in n for n in rec.notes)
    torch.testing.assert_close(out, ops_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ops_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert a.abs().max() > 0
    forward = open(next(tmp_path.glob("graph-*/lowered-forward.txt"))).read()
    backward = open(next(tmp_path.glob("graph-*/lowered-backward.txt"))).read()
    # x cast once for gate and up, each weight and the product once: five amax reductions, three GEMMs
    filecheck("CHECK-COUNT-5: aten.amax.default\nCHECK-NOT: kp.fp8", forward)
    assert forward.count("aten._scaled_mm.default") == 3
    filecheck("CHECK-COUNT-3: aten.amax.default\nCHECK-NOT: kp.fp8", backward)  # one cast per output gradient
    assert backward.count("aten._scaled_mm.default") == 6


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_transformers_llama_mlp_bf16_against_eager():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(1)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu", mlp_bias=False,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaMLP(config).to(torch.bfloat16)
    x = torch.randn(2, 24, 32, dtype=torch.bfloat16)
    out, grads, rec = train_step(model, x, "inductor")
    assert rec.by_rule == {"tensorwise": 3}
    ops_out, ops_grads, _ = train_step(model, x, "ops")
    xe = x.clone().requires_grad_()
    ref = model(xe)
    want = torch.autograd.grad(ref, [xe, *model.parameters()],
                               torch.randn(ref.shape, generator=torch.Generator().manual_seed(9)).to(ref.dtype))
    assert rel(out, ref) < 0.08 and rel(out, ops_out) < 0.02  # bf16 roundings between the ops may differ
    for a, b, c in zip(grads, want, ops_grads):
        assert a is not None and a.dtype == torch.bfloat16
        assert rel(a, b) < 0.2 and rel(a, c) < 0.05  # E5M2 gradients


class Block(nn.Module):
    """A bias, a linear of its own input and a shared input: every training op the pass emits."""

    def __init__(self, d=32, f=64):
        super().__init__()
        self.q, self.k = nn.Linear(d, d, bias=True), nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.q(x)) + self.k(x))


@pytest.mark.parametrize("m", [37, 48], ids=["37-tokens", "48-tokens"])
def test_every_training_op_and_padded_tokens_equal_the_ops_kernels(m):
    """A bias, a linear of its own input (``kp::fp8_linear_train``) and a shared input (``kp::fp8_cast_pair`` +
    ``kp::fp8_linear_shared``), at a token count the weight gradient pads (37) and one it does not."""
    torch.manual_seed(3)
    model, x = Block(), torch.randn(m, 32)
    out, grads, rec = train_step(model, x, "inductor")
    ops_out, ops_grads, _ = train_step(model, x, "ops")
    assert rec.by_rule == {"tensorwise": 3}
    torch.testing.assert_close(out, ops_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ops_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref_x = x.clone().requires_grad_()
    ref = model(ref_x)
    assert rel(out, ref) < 0.08


def test_eager_lowering_runs_the_ops():
    """Only the Inductor lowering decomposes; the eager lowering runs the ops as they are."""
    torch.manual_seed(4)
    model, x = SwiGLU(32, 64), torch.randn(48, 32)
    out, grads, _ = train_step(model, x, "inductor", lowering="eager")
    ops_out, ops_grads, _ = train_step(model, x, "ops")
    torch.testing.assert_close(out, ops_out, rtol=0, atol=0)


def test_bad_value_is_refused():
    from kp_compiler.core.fp8_options import parse_fp8

    with pytest.raises(ValueError, match=r"options\['fp8'\]\['casts'\]='triton' is not one of \['ops', 'inductor'\]"):
        parse_fp8({"casts": "triton"})
    assert parse_fp8({"casts": "ops"}).casts == "ops" and parse_fp8(True).casts == "inductor"  # the default


def test_no_autograd_cache_for_graphs_with_the_training_ops():
    """AOTAutograd's cache key does not cover the decomposition table: such graphs compile without it."""
    import torch._functorch.config as functorch_config

    from kp_compiler.lowering.decompositions import cache_guard

    def with_op(x, w):
        return torch.ops.kp.fp8_linear_train.default(x, w, None, torch.float8_e4m3fn, torch.float8_e5m2)[0]

    gm, plain = fx.symbolic_trace(with_op), fx.symbolic_trace(lambda x, w: x @ w.t())
    parent = nn.Module()
    parent.part = gm  # a tensor-parallel graph's part
    before = functorch_config.enable_autograd_cache
    with cache_guard(gm):
        assert functorch_config.enable_autograd_cache is False
    with cache_guard(parent):
        assert functorch_config.enable_autograd_cache is False
    with cache_guard(plain):
        assert functorch_config.enable_autograd_cache is before


def test_a_dynamic_token_count_decomposes_without_a_guard():
    from tests.lowering.test_fp8 import _dynamic_run

    records, errors = _dynamic_run("inductor")
    assert len(records) == 1 and records[0].guards_added == [], [r.guards_added for r in records]
    (rec,) = [p for p in records[0].passes if p.name == "fp8-linear"]
    assert any("options['fp8']['casts']='inductor'" in n for n in rec.notes)
    assert all(1e-4 < out < 0.1 and grad < 0.2 for out, grad in errors), errors
