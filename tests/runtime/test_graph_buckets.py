"""Captured-graph buckets (``runtime/graph_buckets.py``) with ``EagerRecorder``: CUDA-graph semantics (static
inputs, outputs overwritten in place on replay) on the CPU, so the buffer handling is tested here."""

import pytest
import torch
from torch import nn

from kp_compiler.core.rows import RowProof
from kp_compiler.runtime.graph_buckets import GraphBuckets
from tests.core.test_rows import Block, D
from tests.runtime.test_buckets import compile_bucketed


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_replays_equal_eager_and_outputs_survive_the_next_replay(lowering):
    torch.manual_seed(0)
    model = Block().eval()
    compiled, seen = compile_bucketed(model, torch.randn(3, 6, D), [4, 8], lowering, wrap=GraphBuckets)
    with torch.no_grad():
        outs = []
        for n in (3, 4, 2, 7, 8, 11):
            x = torch.randn(n, 6, D)
            out = compiled(x)
            assert out.shape == (n, 6, D)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
            outs.append((x, out))
        for x, out in outs:  # a returned output is a copy: later replays did not overwrite it
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    graphs = seen["bucketed"]
    # the compiling call (3) captured bucket 4 (returning its warm-up's outputs); 3, 4 and 2 replayed it; 7 captured
    # 8, 8 replayed; 11 ran as it is
    assert graphs.stats["captures"] == 2 and graphs.stats["replays"] == 4 and graphs.stats["above_largest"] == 1
    assert graphs.stats["calls"] == {4: 4, 8: 2}


def test_a_moved_parameter_captures_the_bucket_again():
    lin = nn.Linear(D, D)

    def fn(x, w):
        return [x @ w.t()]
    graphs = GraphBuckets(fn, RowProof(True, inputs=[0, None], outputs=[0], unit=[0]), [4])
    x = torch.randn(3, D)
    graphs(x, lin.weight.detach())
    new_weight = torch.randn(D, D)  # another tensor: the captured graph reads the old address
    (out,) = graphs(x, new_weight)
    torch.testing.assert_close(out, x @ new_weight.t())
    assert graphs.stats["captures"] == 2


def test_capture_all_takes_the_largest_first():
    order = []

    def fn(x):
        order.append(x.shape[0])
        return [x * 2]
    graphs = GraphBuckets(fn, RowProof(True, inputs=[0], outputs=[0], unit=[0]), [2, 4, 8])
    graphs.capture_all([torch.randn(3, D)])
    assert order == [8, 4, 2] and graphs.stats["captures"] == 3
    x = torch.randn(3, D)
    (out,) = graphs(x)
    torch.testing.assert_close(out, x * 2)
    assert graphs.stats["replays"] == 1


def test_a_call_that_captures_runs_the_graph_once():
    """A graph that writes into a buffer (a step counter) writes once per call, the capturing call included:
    the warm-up is that call's run, and the capture runs nothing (the stand-in, like CUDA, computes nothing
    then). Outputs equal eager's at every call, integer outputs too."""
    def fn(x, counter):
        counter.add_(1)
        return [x * counter, (x > 0).sum(-1), x > 0]
    graphs = GraphBuckets(fn, RowProof(True, inputs=[0, None], outputs=[0, 0, 0], unit=[0]), [4])
    counter, eager_counter = torch.zeros(1), torch.zeros(1)
    for n in (3, 2, 4):
        x = torch.randn(n, D)
        got, want = graphs(x, counter), fn(x, eager_counter)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert counter.item() == eager_counter.item()
    assert counter.item() == 3 and graphs.stats["captures"] == 1 and graphs.stats["replays"] == 2


def test_one_recorder_per_device_and_thread(monkeypatch):
    """Every bucketed graph of a device and thread captures with one recorder (one pool, one warm-up stream):
    a stream per capture held a cuBLAS workspace each (32 MiB on the H200) for the life of the process."""
    import threading

    from kp_compiler.runtime import graph_buckets
    from kp_compiler.runtime.graph_buckets import EagerRecorder, shared_recorder

    monkeypatch.setattr(graph_buckets, "_SHARED", {})
    made = []

    def make(device):
        made.append(device)
        return EagerRecorder(device)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    first = shared_recorder(cuda0, make)
    assert shared_recorder(cuda0, make) is first
    other = []
    thread = threading.Thread(target=lambda: other.append(shared_recorder(cuda0, make)))
    thread.start()
    thread.join()
    assert other[0] is not first and shared_recorder(cuda1, make) is not first
    assert made == [cuda0, cuda0, cuda1]
