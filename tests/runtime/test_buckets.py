"""Batch buckets on the CPU (the runtime's path without CUDA graphs): bucket selection, padding that changes
no real row, the run above the largest bucket, and a graph whose rows are not proven being refused."""

import pytest
import torch
from torch import nn

from kp_compiler.core.canonicalize import canonicalize
from kp_compiler.core.rows import batch_symbol, prove_rows
from kp_compiler.lowering.registry import lower
from kp_compiler.runtime.buckets import Bucketed, bucket_sizes, smallest_fitting
from tests.core.test_rows import Block, D


def test_bucket_sizes_from_a_list_or_powers_of_two():
    assert bucket_sizes([8, 2, 4, 2]) == [2, 4, 8]
    assert bucket_sizes("pow2:64") == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes("pow2:48") == [1, 2, 4, 8, 16, 32, 48]
    for bad in ("pow3:8", "pow2:", "pow2:0", [], [0, 4], [2.5], [True]):
        with pytest.raises(ValueError, match="bucket"):
            bucket_sizes(bad)


@pytest.mark.parametrize("n,bucket", [(1, 1), (3, 4), (4, 4), (5, 8), (8, 8), (9, None), (40, None)])
def test_the_smallest_bucket_that_fits(n, bucket):
    assert smallest_fitting(n, [1, 2, 4, 8]) == bucket


def compile_bucketed(model, x, sizes, lowering, wrap=Bucketed):
    """``model`` captured once with a dynamic batch, its canonical graph lowered (``eager``: run as it is) and
    wrapped in ``wrap`` (``Bucketed``); returns the compiled callable and what the backend saw."""
    seen = {}

    def backend(gm, example_inputs):
        cgm, _, _ = canonicalize(gm, example_inputs)
        fn = lower("inductor", cgm, example_inputs, "default", {}) if lowering == "inductor" else cgm
        seen["compiles"] = seen.get("compiles", 0) + 1
        symbol = batch_symbol(cgm)
        if symbol is None:  # a static batch (Dynamo compiles a batch of 1 on its own): exact size only
            return fn
        seen["bucketed"] = wrap(fn, prove_rows(cgm.graph, symbol), sizes)
        return seen["bucketed"]

    torch._dynamo.reset()
    x = x.clone()
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(x)
    return compiled, seen


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_padding_changes_no_real_row_and_sizes_above_the_largest_run_unpadded(lowering):
    torch.manual_seed(0)
    model = Block().eval()
    compiled, seen = compile_bucketed(model, torch.randn(3, 6, D), [2, 4, 8], lowering)
    with torch.no_grad():
        for n in (1, 3, 4, 5, 8, 11):
            x = torch.randn(n, 6, D)
            out = compiled(x)
            assert out.shape == (n, 6, D)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    stats = seen["bucketed"].stats
    # one symbolic-batch graph served every size but 1, which Dynamo specializes and compiles on its own
    assert seen["compiles"] == 2
    assert stats["calls"] == {4: 3, 8: 2} and stats["above_largest"] == 1  # the first call (3) went to 4


def test_the_batch_size_dynamo_hands_in_becomes_the_buckets():
    """A graph that reads its batch size (a view to [B, S*D]) gets the bucket's, matching the padded rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(1), nn.Linear(6 * D, 4)).eval()
    compiled, seen = compile_bucketed(model, torch.randn(3, 6, D), [4, 8], "eager")
    assert seen["bucketed"].proof.sizes  # Dynamo passes the batch size in
    with torch.no_grad():
        x = torch.randn(5, 6, D)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_graph_whose_rows_mix_is_refused_with_the_reason():
    torch.manual_seed(0)
    with pytest.raises(Exception, match="not proven independent.*mean"):
        compile_bucketed(lambda x: x - x.mean(0), torch.randn(3, D), [4], "eager")


def test_the_padding_check_sees_a_leak_where_the_proof_is_forged():
    """The check above can fail: with a forged proof, a mean over the batch takes the padded zero rows in."""
    from kp_compiler.core.rows import RowProof

    def mixes(x):
        return x - x.mean(0)

    forged = Bucketed(mixes, RowProof(True, inputs=[0], outputs=[0], unit=[0]), [8])
    x = torch.randn(3, D)
    assert not torch.allclose(forged(x), mixes(x))


def test_inputs_and_outputs_with_several_rows_per_batch_element():
    """``[B*S, d]`` rows (tokens flattened): padded to ``S * bucket`` rows and narrowed to ``S * n``."""
    torch.manual_seed(0)
    lin = nn.Linear(D, D).eval()

    def flat(x):
        return lin(x.reshape(-1, D)), x.sum(-1)
    compiled, seen = compile_bucketed(flat, torch.randn(3, 4, D), [8], "eager")
    with torch.no_grad():
        x = torch.randn(5, 4, D)
        (rows, sums), (want_rows, want_sums) = compiled(x), flat(x)
    assert rows.shape == (20, D) and sums.shape == (5, 4)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, want_sums)
    assert seen["bucketed"].stats["calls"] == {8: 2}


def test_buckets_past_the_compiled_range_are_not_used():
    from kp_compiler.core.rows import RowProof

    bucketed = Bucketed(lambda x: x * 2, RowProof(True, inputs=[0], outputs=[0], unit=[0], max_batch=6), [4, 8])
    assert bucketed.sizes == [4]
    x = torch.randn(5, D)
    torch.testing.assert_close(bucketed(x), x * 2)
    assert bucketed.stats == {"calls": {}, "above_largest": 1}
