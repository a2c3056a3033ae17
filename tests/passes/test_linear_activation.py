"""``linear-activation`` (``passes/linear/activation.py``): every form rewritten with outputs and gradients equal
to eager (fp32, bf16), the MLPs of transformers' Llama, nanoGPT and torch's TransformerEncoderLayer, the look-alikes
left alone with the reason in the report, and one graph over dynamic batch sizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from kp_compiler.passes.linear.activation import linear_activation
from tests.utils import check_forward_backward, compile_and_collect

PASSES = ["noop-elimination", "linear-activation"]
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
D, H = 16, 24


class Single(nn.Module):
    def __init__(self, act, bias):
        super().__init__()
        self.fc, self.proj, self.act = nn.Linear(D, H, bias=bias), nn.Linear(H, D), ACTS[act]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Gated(nn.Module):
    def __init__(self, act, bias, up_first=False):
        super().__init__()
        self.gate, self.up = nn.Linear(D, H, bias=bias), nn.Linear(D, H, bias=bias)
        self.down, self.act, self.up_first = nn.Linear(H, D, bias=False), ACTS[act], up_first

    def forward(self, x):
        if self.up_first:
            return self.down(self.up(x) * self.act(self.gate(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


def pass_of(records):
    (found,) = [p for r in records for p in r.passes if p.name == "linear-activation"]
    return found


def fresh(dtype, shape=(2, 5, D)):
    def make():
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            yield (torch.randn(*shape, generator=g).to(dtype),)
    return make


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def check(model, dtype, rule, train=True):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = model.to(dtype)
    x = torch.randn(2, 5, D, dtype=dtype, requires_grad=train)
    with torch.set_grad_enabled(train):
        compiled, _, records = compile_and_collect(model, [x], passes=PASSES)
    found = pass_of(records)
    assert found.status == "ok" and found.matches == 1 and found.by_rule == {rule: 1}, (found, found.notes)
    if train:
        check_forward_backward(model, compiled, fresh(dtype), **TOL[dtype])
    else:
        with torch.no_grad():
            for (y,) in fresh(dtype)():
                torch.testing.assert_close(compiled(y), model(y), **TOL[dtype])
    return records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_linear_then_activation(dtype, act, bias):
    check(Single(act, bias), dtype, "single")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias,up_first", [(False, False), (True, False), (False, True)])
def test_gated(dtype, act, bias, up_first):
    check(Gated(act, bias, up_first), dtype, "gated")


@pytest.mark.parametrize("train", [False, True])
def test_training_graphs_get_the_variant_that_keeps_the_pre_activations(train, tmp_path):
    torch._dynamo.reset()
    model = Gated("silu", False)
    x = torch.randn(3, D, requires_grad=train)
    with torch.set_grad_enabled(train):
        compile_and_collect(model, [x], passes=PASSES, dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "02-linear-activation.txt").read_text()
    assert ("kp.gated_linear_train.default" in text) == train
    assert ("kp.gated_linear.default" in text) == (not train)


def test_transformers_llama_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=H, hidden_act="silu", mlp_bias=False,
                                     num_attention_heads=2, num_key_value_heads=2)
    check(LlamaMLP(config), torch.float32, "gated")


def test_transformers_gemma_mlp_geglu():
    """Gemma's MLP: ``gelu_pytorch_tanh(gate_proj(x)) * up_proj(x)`` (transformers' ``ACT2FN``)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    config = transformers.GemmaConfig(hidden_size=D, intermediate_size=H, hidden_activation="gelu_pytorch_tanh",
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    check(GemmaMLP(config), torch.float32, "gated")


def test_nanogpt_mlp():
    class MLP(nn.Module):  # nanoGPT's MLP, as written there
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(D, 4 * D)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * D, D)
            self.dropout = nn.Dropout(0.0)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
    check(MLP(), torch.float32, "single")


def test_torch_transformer_encoder_layer_in_eval():
    """In eval mode its dropouts are no-ops (noop-elimination drops them) and ``relu`` reads ``linear1``. (Without
    gradients torch runs the layer as one native op, ``_transformer_encoder_layer_fwd``: nothing to match.)"""
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=H, dropout=0.1, batch_first=True).eval()
    check(layer, torch.float32, "single")


def lookalike(fn, *inputs):
    torch._dynamo.reset()
    compiled, out, records = compile_and_collect(fn, list(inputs), passes=PASSES)
    torch.testing.assert_close(out, fn(*inputs))
    found = pass_of(records)
    assert found.matches == 0, found.by_rule
    return found.notes


def test_a_pre_activation_read_elsewhere_is_left_alone():
    lin = nn.Linear(D, H)

    def fn(x):
        h = lin(x)
        return F.silu(h) + h.sum()
    assert lookalike(fn, torch.randn(3, D)) == []


def test_a_weight_that_is_not_a_parameter_is_left_alone():
    notes = lookalike(lambda x, w: F.gelu(F.linear(x, w)), torch.randn(3, D), torch.randn(H, D))
    assert any("not a parameter" in n for n in notes), notes


def test_a_gate_and_up_of_different_inputs_is_not_gated():
    gate, up = nn.Linear(D, H), nn.Linear(D, H)
    torch._dynamo.reset()
    compiled, out, records = compile_and_collect(lambda x: F.silu(gate(x)) * up(x * 2), [torch.randn(3, D)],
                                                 passes=PASSES)
    assert pass_of(records).by_rule == {"single": 1}  # only silu(gate(x)): the product reads another input


def test_mismatched_dtypes_are_named():
    """A graph where x and the weight differ in dtype (eager would refuse it; a pass must not build on it)."""
    with FakeTensorMode() as mode:
        x, w, z = torch.empty(4, D), torch.empty(H, D, dtype=torch.bfloat16), torch.empty(4, H)
    graph = fx.Graph()
    nx, nw = graph.placeholder("x"), graph.placeholder("w")
    nx.meta["val"], nw.meta["val"] = x, w
    lin = graph.call_function(torch.ops.aten.linear.default, (nx, nw))
    act = graph.call_function(torch.ops.aten.relu.default, (lin,))
    lin.meta["val"], act.meta["val"] = z, mode.from_tensor(torch.empty(4, H))
    graph.output((act,))
    result = linear_activation(fx.GraphModule(nn.Module(), graph))
    assert result == 0 and any("do not share one dtype" in n for n in result.notes), result.notes


@pytest.mark.parametrize("train", [False, True])
def test_one_graph_over_dynamic_sizes_with_gradients(train):
    """transformers' ``LlamaMLP`` under ``dynamic=True`` at three token counts: one graph, the pass adds no shape
    guard, outputs (and in training every gradient) equal to eager at each size."""
    from kp_compiler.core.report import collect
    from kp_compiler.testing.compare import assert_same_grads
    from tests.utils import grads_of

    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaMLP(transformers.LlamaConfig(hidden_size=D, intermediate_size=H, hidden_act="silu",
                                              num_attention_heads=2, num_key_value_heads=2))
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES}, dynamic=True)
    with collect() as records, torch.set_grad_enabled(train):
        for rows in (3, 7, 12):
            x = torch.randn(2, rows, D, requires_grad=train)
            got = compiled(x)
            want = model(x.detach().requires_grad_(train))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if train:
                model.zero_grad(set_to_none=True)
                got.square().mean().backward()
                got_grads = grads_of(model.named_parameters())
                model.zero_grad(set_to_none=True)
                want.square().mean().backward()
                assert_same_grads(got_grads, grads_of(model.named_parameters()), rtol=1e-5, atol=1e-6)
    assert len(records) == 1, [r.id for r in records]
    found = pass_of(records)
    assert found.matches == 1 and found.by_rule == {"gated": 1} and found.guards_added == []


def test_not_under_autocast():
    """Under ``torch.autocast`` eager's linears return bf16; the ops have no autocast rule and would return fp32:
    the pass does not apply, says why, and the output is eager's, dtype included."""
    from kp_compiler.core.report import collect

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Gated("silu", bias=False)
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES})
    x = torch.randn(2, 5, D)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with collect() as records:
            got = compiled(x)
        want = model(x)
    reasons = [s["reason"] for r in records for s in r.skipped if s["pass"] == "linear-activation"]
    assert reasons and "torch.autocast is on" in reasons[0]
    assert not [f for r in records for f in r.fallbacks]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
