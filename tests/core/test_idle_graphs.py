"""Graphs with nothing any default pass could rewrite skip canonicalization and the passes (issue 14).

A pass declares its anchors (``register_pass(..., anchors=...)``); when every chosen pass has them and
none is in the Dynamo graph, the lowering gets the graph as Dynamo captured it: no compile-time cost over
the lowering itself. Passes named in ``options["passes"]`` always run.
"""

import os

import torch
from torch import fx

import kp_compiler
from kp_compiler.core.pass_manager import idle_reason
from kp_compiler.testing.models import MLP
from tests.utils import check_forward_backward, compile_and_collect, load_report


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class WithFunction(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(Square.apply(self.a(x)))


def _graph(fn, *inputs) -> fx.GraphModule:
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab)(*inputs)
    return graphs[0]


def test_idle_reason_reads_the_anchors_of_every_pass():
    mlp = _graph(MLP(d=8, hidden=16), torch.randn(2, 8))
    att = _graph(Attention(), *(torch.randn(1, 2, 4, 8) for _ in range(3)))
    defaults = ["noop-elimination", "attention-to-sdpa", "moe-dispatch"]
    assert idle_reason(mlp, defaults) == "the graph has no masked sdpa or softmax or topk"
    assert idle_reason(att, defaults) is None
    qkv = [torch.randn(1, 2, 4, 8) for _ in range(3)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert idle_reason(_graph(lambda q, k, v: sdpa(q, k, v, is_causal=True), *qkv), defaults) is not None
    masked = _graph(lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool).tril()), *qkv)
    assert idle_reason(masked, defaults) is None, "an SDPA mask may be index arithmetic to lift"
    assert idle_reason(mlp, ["noop-elimination"]) == "no pass looks for anything"
    kp_compiler.register_pass("test-no-anchors", lambda gm: 0, replace=True)
    try:
        assert idle_reason(mlp, defaults + ["test-no-anchors"]) is None, "a pass without anchors always may apply"
    finally:
        kp_compiler.unregister_pass("test-no-anchors")


def test_a_graph_without_anchors_is_lowered_as_dynamo_captured_it(tmp_path):
    torch._dynamo.reset()
    model = WithFunction()
    compiled, out, records = compile_and_collect(model, (torch.randn(4, 8),), dump_dir=str(tmp_path))
    (rec,) = records
    assert rec.passes == [] and not rec.fallbacks
    idle = {s["pass"] for s in rec.skipped if "nothing to rewrite (the graph has no masked sdpa or softmax" in s["reason"]}
    # linear-cross-entropy does not apply (the CPU) and the graph has no cross-entropy: not mentioned
    assert idle == set(kp_compiler.default_passes()) - {"moe-dispatch", "fp8-linear", "linear-cross-entropy",
                                                        "linear-group"}
    assert not [s for s in rec.skipped if s["pass"] == "linear-cross-entropy"], rec.skipped
    # a pass that had something to look at (a linear) but does not apply says why
    assert {"pass": "fp8-linear", "reason": "not applicable on this target: FP8 is off (options['fp8'])"} in rec.skipped
    assert [s["reason"] for s in rec.skipped if s["pass"] == "linear-group"] == [
        "not applicable on this target: only under mode='reduce-overhead', where a step's time is its kernels' GPU time"]
    assert rec.nodes_in == rec.nodes_out > 0
    files = os.listdir(load_report(tmp_path)["graphs"][0]["dump"])
    assert "dynamo.txt" in files and "00-input.txt" not in files, files  # never canonicalized
    # gradients through the custom autograd.Function, as eager
    check_forward_backward(model, compiled, lambda: [(torch.randn(5, 8),), (torch.randn(3, 8),)])


def test_a_graph_with_an_anchor_runs_the_passes():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    _, out, records = compile_and_collect(Attention(), (q, k, v))
    assert not [s for s in records[0].skipped if "nothing to rewrite" in s["reason"]], records[0].skipped
    assert {p.name: p.matches for p in records[0].passes}["attention-to-sdpa"] == 1
    torch.testing.assert_close(out, Attention()(q, k, v))


def test_named_passes_always_run():
    torch._dynamo.reset()
    _, _, records = compile_and_collect(MLP(d=8, hidden=16), (torch.randn(2, 8),), passes=["noop-elimination"])
    assert [p.name for p in records[0].passes] == ["noop-elimination"] and not records[0].skipped


def test_fp8_option_keeps_the_pipeline():
    torch._dynamo.reset()
    _, _, records = compile_and_collect(MLP(d=32, hidden=64), (torch.randn(80, 32),),
                                        fp8={"emulate": True, "min_dims": [64, 64, 32]})
    assert "fp8-linear" in [p.name for p in records[0].passes]
    assert [s["pass"] for s in records[0].skipped] == ["linear-group"]  # not applicable in default mode
