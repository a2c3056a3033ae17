"""Scores built by ``baddbmm(bias, q, k^T, beta=1, alpha=c)``: BLOOM's ALiBi, from transformers' own model.

``baddbmm`` adds its bias before the scaling ``alpha`` is applied to the
product only, so the bias becomes SDPA's additive mask and ``alpha`` its
scale. A scaling after the ``baddbmm`` would scale the bias too, and
``beta != 1`` scales it: both are left alone.
"""

import math

import pytest
import torch

from kp_compiler.testing import hf
from kp_compiler.testing.compare import assert_same_grads, grads_of
from tests.utils import compile_and_collect, input_grads

BH, L, D = 8, 32, 16


def pass_record(records, name):
    (rec,) = [p for r in records for p in r.passes if p.name == name]
    return rec


def bloom_like(beta=1.0, after=None):
    """BLOOM's attention: baddbmm of a per-head ALiBi bias, a causal mask, softmax in float32, a view, bmm."""
    def fn(q, k, v, alibi):
        scores = alibi.baddbmm(q, k.transpose(-1, -2), beta=beta, alpha=1 / math.sqrt(D))
        if after is not None:
            scores = after(scores)
        s = scores.view(2, BH // 2, L, L)
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        s = s + torch.where(keep, 0.0, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).view(BH, L, L)
        return torch.bmm(p, v)
    return fn


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BH, L, D, generator=g) for _ in range(3))
    alibi = torch.randn(BH, 1, L, generator=g)  # the per-head, per-key bias BLOOM builds from its mask
    return [q, k, v, alibi]


def test_baddbmm_bias_becomes_the_sdpa_mask():
    fn = bloom_like()
    compiled, out, records = compile_and_collect(fn, inputs(0))
    assert pass_record(records, "attention-to-sdpa").by_rule == {"mask-tensor": 1}
    for seed in (1, 2):
        xs = inputs(seed)
        got, got_g = input_grads(lambda q, k, v: compiled(q, k, v, xs[3]), xs[:3])
        ref, want_g = input_grads(lambda q, k, v: fn(q, k, v, xs[3]), xs[:3])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert_same_grads(got_g, want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, fn", [
    ("beta 2 scales the bias", bloom_like(beta=2.0)),
    ("a scaling after baddbmm scales the bias", bloom_like(after=lambda s: s * 0.5)),
])
def test_baddbmm_whose_bias_is_scaled_is_left_alone(name, fn):
    _, out, records = compile_and_collect(fn, inputs(0))
    assert pass_record(records, "attention-to-sdpa").matches == 0, name
    torch.testing.assert_close(out, fn(*inputs(0)), rtol=1e-5, atol=1e-5)


def test_transformers_bloom_with_padding_matches_eager():
    """transformers' BLOOM (eager attention, its only path): ALiBi from the padding mask via baddbmm."""
    model, vocab = hf.build("bloom", "tiny", attn="eager")
    ids = torch.randint(0, vocab, (2, 32))
    pad = torch.ones(2, 32, dtype=torch.long)
    pad[0, :5] = 0

    def loss(ids, pad):  # over real tokens only, as training with padding does: a padded query's row has no
        # key, and eager's uniform weights there are arithmetic on finfo.min, not a value to compare
        return (model(ids, attention_mask=pad).logits.float().square() * pad[..., None]).mean()

    compiled = torch.compile(loss, backend="kernelpytorch")
    from kp_compiler.core.report import collect

    with collect() as records:
        got = compiled(ids, pad)
    got.backward()
    assert pass_record(records, "attention-to-sdpa").by_rule == {"mask-tensor": 2}
    got_g = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    want = loss(ids, pad)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_grads(got_g, grads_of(model.named_parameters()), rtol=1e-4, atol=1e-5)
