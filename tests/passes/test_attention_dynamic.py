"""Symbolic sequence lengths: masks lifted for every length, one compile for three lengths."""

import pytest
import torch

from kp_compiler.core.report import collect
from kp_compiler.testing import hf
from kp_compiler.testing.compare import assert_same_grads
from tests.passes.test_given_sdpa import MaskedSdpa, causal, window
from tests.utils import loss_and_grads

LENGTHS = (24, 40, 56)


def attention_rules(records):
    return {p.name: p.by_rule for r in records for p in r.passes if p.name.startswith("attention")}


@pytest.mark.parametrize("mask_function,rule", [(causal, "sdpa-causal"), (window, "sdpa-mask_mod")],
                         ids=["causal", "window"])
def test_sdpa_masks_lift_with_symbolic_lengths(mask_function, rule):
    """The mask is lifted op by op (``mask_mod.py``): the lifted expression holds for every length, so no grid
    is needed; causal becomes is_causal, the window stays a tagged SDPA mask (flex needs static lengths)."""
    fn = MaskedSdpa(mask_function)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for L in LENGTHS:
            q, k, v = torch.randn(2, 4, L, 16), torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(records) == 1, "one compile for three lengths"
    assert attention_rules(records)["attention-to-sdpa"] == {rule: 1}


def test_transformers_eager_llama_with_dynamic_lengths():
    """``dynamic=True`` makes the module's ``self.scaling`` a symbolic float: it scales q before SDPA."""
    model, vocab = hf.build("llama", "tiny", attn="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", dynamic=True)
    with torch.no_grad(), collect() as records:
        for T in LENGTHS:
            ids = torch.randint(0, vocab, (2, T))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(records) == 1
    assert attention_rules(records)["attention-to-sdpa"] == {"causal": 2}


def test_transformers_eager_llama_dynamic_training_gradients():
    """With the cache on (transformers' default), the mask is plain index arithmetic and is proven for every
    length. (With use_cache=False, transformers 5.24 derives it from packed-sequence detection over its
    positions, diff and cumsum, which only the by-value proof reads: static lengths only.)"""
    model, vocab = hf.build("llama", "tiny", attn="eager")
    model.train()
    torch._dynamo.reset()
    step = torch.compile(lambda i: model(i, labels=i).loss, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for T in LENGTHS:
            ids = torch.randint(0, vocab, (2, T))
            loss, got = loss_and_grads(model, step, ids)
            ref, want = loss_and_grads(model, lambda i: model(i, labels=i).loss, ids)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            assert_same_grads(got, want, rtol=1e-4, atol=1e-5)
    assert len(records) == 1
    assert attention_rules(records)["attention-to-sdpa"] == {"causal": 2}


def test_float_index_arithmetic_is_not_lifted_without_a_grid():
    """Positions cast to bf16 round above 256; the op-by-op lift treats the cast as exact, so with symbolic
    lengths (no grid to check) only int and bool arithmetic is accepted."""
    def fn(q, k, v):
        i = torch.arange(q.shape[2]).to(torch.bfloat16)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for L in LENGTHS:
            q, k, v = (torch.randn(2, 4, L, 16) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(records) == 1
    assert attention_rules(records)["attention-to-sdpa"] == {}
