"""``options["cudagraph_buckets"]`` through the backend: the option's values, where it applies and where the
report says why not. On the CPU, CUDA is stood in for by ``EagerRecorder`` (CUDA graphs' replay semantics)."""

import pytest
import torch
from torch import nn

from kp_compiler import backend
from kp_compiler.core.report import collect
from kp_compiler.options import parse_options
from kp_compiler.runtime.graph_buckets import EagerRecorder, GraphBuckets
from tests.core.test_rows import Block, D


def test_the_option_takes_sizes_or_a_policy():
    assert parse_options(None, {"cudagraph_buckets": [8, 2, 4]}).cudagraph_buckets == (2, 4, 8)
    assert parse_options(None, {"cudagraph_buckets": "pow2:8"}).cudagraph_buckets == (1, 2, 4, 8)
    assert parse_options(None, {}).cudagraph_buckets is None
    with pytest.raises(ValueError, match="cudagraph_buckets"):
        parse_options(None, {"cudagraph_buckets": "all"})


def run(model, sizes_seen, mode="reduce-overhead", first=3):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch",  # torch.compile takes mode or options, not both
                             options={"mode": mode, "cudagraph_buckets": [4, 8], "passes": ["noop-elimination"]})
    x = torch.randn(first, 6, D)
    torch._dynamo.mark_dynamic(x, 0)
    with collect() as records, torch.no_grad():
        compiled(x)
        for n in sizes_seen:
            y = torch.randn(n, 6, D)
            torch.testing.assert_close(compiled(y), model(y), rtol=1e-5, atol=1e-5)
    return records


def made_buckets(monkeypatch) -> list:
    """The ``GraphBuckets`` the backend makes from now on, in order."""
    made = []
    real_init = GraphBuckets.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(GraphBuckets, "__init__", spy)
    return made


def test_on_cuda_an_inference_graph_with_rows_apart_is_bucketed(monkeypatch):
    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_recorder", EagerRecorder)
    made = made_buckets(monkeypatch)
    torch.manual_seed(0)
    records = run(Block().eval(), [4, 2, 7, 8, 11])
    (graphs,) = made
    assert [r.buckets for r in records] == [{"sizes": [4, 8], "runtime": graphs.stats}]
    assert graphs.stats["captures"] == 2 and graphs.stats["above_largest"] == 1
    # the report's counts are the runtime's, as they stand after the calls (3, 4, 2 -> 4; 7, 8 -> 8; 11 above)
    assert records[0].to_json()["buckets"]["runtime"]["calls"] == {4: 3, 8: 2}


@pytest.mark.parametrize("mode,why", [("reduce-overhead", "CUDA graphs need CUDA inputs"),
                                      ("default", "mode='reduce-overhead'")])
def test_elsewhere_the_report_says_why_not(mode, why):
    torch.manual_seed(0)
    records = run(Block().eval(), [5], mode=mode)
    assert why in records[0].buckets["why"]


def test_a_training_graph_is_not_bucketed_and_its_gradients_equal_eager(monkeypatch):
    """Parameter gradients sum over the batch: padded rows would add to them. The training graph keeps
    Inductor's path, says why, and every gradient matches eager's (None on neither side)."""
    from kp_compiler.testing.compare import assert_same_grads

    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_recorder", EagerRecorder)
    torch.manual_seed(0)
    model = Block().train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"mode": "reduce-overhead", "cudagraph_buckets": [4, 8],
                                      "passes": ["noop-elimination"]})
    x = torch.randn(3, 6, D)
    torch._dynamo.mark_dynamic(x, 0)
    with collect() as records:
        compiled(x).square().mean().backward()
    got = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    assert_same_grads(got, want, rtol=1e-5, atol=1e-6)
    assert records and all("a training graph" in r.buckets["why"] for r in records), [r.buckets for r in records]


def test_rows_that_mix_are_named_in_the_report(monkeypatch):
    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_recorder", EagerRecorder)

    class Centered(nn.Module):
        def forward(self, x):
            return x - x.mean(0)
    records = run(Centered(), [5])
    assert "rows not proven independent" in records[0].buckets["why"] and "over dim 0" in records[0].buckets["why"]


def test_explain_says_whether_buckets_were_used(monkeypatch):
    from kp_compiler import explain

    torch.manual_seed(0)
    model = nn.Linear(D, D).eval()
    x = torch.randn(3, D)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        text = str(explain(model, x, mode="reduce-overhead", cudagraph_buckets=[4, 8]))
    assert "batch buckets not used: CUDA graphs need CUDA inputs" in text
    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_recorder", EagerRecorder)
    torch._dynamo.reset()
    with torch.no_grad():
        text = str(explain(model, x, mode="reduce-overhead", cudagraph_buckets=[4, 8]))
    assert "batch buckets: [4, 8] (one CUDA graph each, inputs padded)" in text
    # explain's one call (batch 3) captured bucket 4 (its warm-up was the call); the stand-in has no pool
    assert ("captured 1, replays 0, calls per bucket {4: 1}, above the largest 0 (run without CUDA graphs)"
            in text), text


def test_bucket_counts_line_with_a_pool():
    from kp_compiler.explain import bucket_counts

    line = bucket_counts({"calls": {8: 2, 4: 5}, "above_largest": 1, "captures": 2, "replays": 7,
                          "pool_bytes": 3 * 2**20})
    assert line == ("captured 2, replays 7, calls per bucket {4: 5, 8: 2}, above the largest 1 (run without CUDA "
                    "graphs), pool 3.0 MiB")


def test_an_expert_loop_is_bucketed_once_rewritten_to_the_routed_op(monkeypatch):
    """The unrolled loop routes by data-dependent sizes; rewritten (``moe-dispatch``), each token's output comes
    from its own row through ``kp::routed_experts``, which the proof has a rule for: the decode layer buckets."""
    from kp_compiler.testing.models import LoopMoE

    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_recorder", EagerRecorder)
    torch.manual_seed(0)
    model = LoopMoE(D, 24, 4, 2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", options={
        "mode": "reduce-overhead", "cudagraph_buckets": [4, 8], "passes": ["noop-elimination", "moe-dispatch"]})
    x = torch.randn(3, 1, D)
    torch._dynamo.mark_dynamic(x, 0)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), collect() as records, torch.no_grad():
        compiled(x)
        for n in (2, 5, 8, 13):
            y = torch.randn(n, 1, D)
            torch.testing.assert_close(compiled(y), model(y), rtol=1e-5, atol=1e-5)
    moe = [p for r in records for p in r.passes if p.name == "moe-dispatch"]
    assert moe and moe[0].matches == 1
    assert records[0].buckets["sizes"] == [4, 8], records[0].buckets
    runtime = records[0].buckets["runtime"]
    assert runtime["calls"] == {4: 2, 8: 2} and runtime["above_largest"] == 1


def test_two_bucketed_graphs_share_one_recorder(monkeypatch):
    """Two bucketed graphs on one device (two models here; the decode model's positional and keyword calls on
    the H200) capture with the device's one recorder (its pool and warm-up stream), not one each."""
    from kp_compiler.runtime import graph_buckets

    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    monkeypatch.setattr(backend, "_cuda_device", lambda inputs: torch.device("cuda", 0))
    monkeypatch.setattr(graph_buckets, "_SHARED", {})
    monkeypatch.setattr(backend, "shared_recorder",
                        lambda device: graph_buckets.shared_recorder(device, EagerRecorder))
    made = made_buckets(monkeypatch)
    torch.manual_seed(0)
    torch._dynamo.reset()
    x = torch.randn(3, 6, D)
    torch._dynamo.mark_dynamic(x, 0)
    class Other(Block):  # another class: Dynamo makes it a graph of its own
        pass
    for model in (Block().eval(), Other().eval()):
        compiled = torch.compile(model, backend="kernelpytorch", options={
            "mode": "reduce-overhead", "cudagraph_buckets": [4, 8], "passes": ["noop-elimination"]})
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)  # x: its batch is dynamic
            y = torch.randn(2, 6, D)
            torch.testing.assert_close(compiled(y), model(y), rtol=1e-5, atol=1e-5)
    assert len(made) == 2 and made[0].recorder is made[1].recorder
