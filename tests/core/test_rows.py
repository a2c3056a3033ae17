"""The row-independence proof (``core/rows.py``): graphs whose rows stay apart along the batch, each op that
mixes them, and, for every proven graph, padding the batch changes no real row's result."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.core.canonicalize import canonicalize
from kp_compiler.core.rows import batch_symbol, prove_rows

D = 16


def proof_of(fn, x):
    """Capture ``fn`` with a dynamic batch (dim 0 of ``x``) to the canonical ATen graph and prove it."""
    seen = {}

    def backend(gm, example_inputs):
        cgm, _, _ = canonicalize(gm, example_inputs)
        seen["gm"] = cgm
        return gm.forward

    torch._dynamo.reset()
    x = x.clone()
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # x[mask] in one graph
        torch.compile(fn, backend=backend, fullgraph=True)(x)
    symbol = batch_symbol(seen["gm"])
    assert symbol is not None
    return prove_rows(seen["gm"].graph, symbol)


def padding_changes_nothing(fn, x, pad=3):
    """The real rows' results with the batch padded by ``pad`` random rows equal the unpadded ones."""
    with torch.no_grad():
        want = fn(x)
        got = fn(torch.cat([x, torch.randn(pad, *x.shape[1:])]))
    torch.testing.assert_close(got[: x.shape[0]], want, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    """A pre-norm attention block written the way nanoGPT writes it (batch first)."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, S, D)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TokensFlat(nn.Module):
    """Embedding, tokens flattened to rows for an MLP and back (as MoE and fused-loss code does)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, D), nn.Linear(D, D)

    def forward(self, ids):
        h = self.emb(ids)
        B, S, d = h.shape
        return torch.relu(self.fc(h.reshape(B * S, d))).reshape(B, S, d).sum(-1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


POSITIVE = {
    "mlp": (lambda: nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)), lambda: torch.randn(5, D)),
    "attention-block": (Block, lambda: torch.randn(5, 6, D)),
    "tokens-flattened": (TokensFlat, lambda: torch.randint(0, 50, (5, 7))),
    "conv-batchnorm-eval": (lambda: ConvNet().eval(), lambda: torch.randn(5, 3, 8, 8)),
    "softmax-over-features": (lambda: (lambda x: torch.softmax(x, -1) * x.topk(2, dim=-1).values.sum(-1, True)),
                              lambda: torch.randn(5, D)),
    "prefix-of-free-data": (lambda: (lambda x: x + torch.arange(80.0)[: x.shape[0] * 4].view(x.shape[0], 4)
                                     .repeat(1, D // 4)), lambda: torch.randn(5, D)),  # row i: 4i..4i+3, any B
    "normalize-rows": (lambda: (lambda x: F.normalize(x, dim=-1) + torch.max(x, torch.zeros(1))),
                       lambda: torch.randn(5, D)),
    "positions-from-arange": (lambda: (lambda x: x + torch.arange(x.shape[0]).unsqueeze(-1) * 0.5),
                              lambda: torch.randn(5, D)),
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_row_independent_graphs_are_proven_and_padding_changes_no_row(name):
    make_model, make_input = POSITIVE[name]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    proof = proof_of(model, x)
    assert proof.ok, (proof.node, proof.reason)
    assert proof.outputs == [0]
    if x.is_floating_point():
        padding_changes_nothing(model, x)


class Scaled(nn.Module):
    def forward(self, x):
        return x / x.shape[0]


NEGATIVE = {
    "batchnorm-training": (lambda: nn.BatchNorm1d(D).train(), "BatchNorm in training"),
    "mean-over-batch": (lambda: (lambda x: x - x.mean(0)), "over dim 0"),
    "softmax-over-batch": (lambda: (lambda x: torch.softmax(x, 0)), "over dim 0"),
    "layer-norm-over-batch": (lambda: (lambda x: F.layer_norm(x.t(), x.shape[:1])), "normalises over the batch axis"),
    "topk-over-tokens": (lambda: (lambda x: torch.topk(x, 2, dim=0).values), "over dim 0"),
    "sort-over-batch": (lambda: (lambda x: torch.sort(x, 0).values), "over dim 0"),
    "cumsum-over-batch": (lambda: (lambda x: torch.cumsum(x, 0)), "over dim 0"),
    "attention-across-rows": (lambda: (lambda x: F.scaled_dot_product_attention(*(x[None, None],) * 3)[0, 0]),
                              "sequence or head dim"),
    "batch-size-as-a-value": (Scaled, "computed from the batch size"),
    "dropout-training": (lambda: nn.Dropout(0.5).train(), "random numbers"),
    "cat-along-batch": (lambda: (lambda x: torch.cat([x, x], 0)), "along the batch axis"),
    "first-row": (lambda: (lambda x: x[:1] + x), "slices the batch axis"),
    "boolean-mask": (lambda: (lambda x: x[x > 0]), "indexes along the batch axis"),
    "full-reduction": (lambda: (lambda x: x.sum()), "every dim"),
    "rows-interleaved": (lambda: (lambda x: x.view(-1, 2, D // 2).transpose(0, 1).reshape(-1, D // 2)),
                         "inside another dim"),
    "free-data-shaped-by-batch": (lambda: (lambda x: x + torch.arange(60.0).view(x.shape[0], -1).sum(-1, True)),
                                  "the batch size is in dims"),  # row i holds 60/B values: it changes with B
    # found by review: each was proven before and changed real rows when padded
    "norm-of-everything": (lambda: (lambda x: x / x.norm(1)), "every dim"),
    "vector-norm-over-batch": (lambda: (lambda x: x / torch.linalg.vector_norm(x, dim=0)), "over dim 0"),
    "std-unbiased-flag": (lambda: (lambda x: x / x.t().std(False)), "every dim"),
    "var-mean-of-everything": (lambda: (lambda x: x / torch.var_mean(x.t(), False)[0]), "every dim"),
    "view-as-a-transpose": (lambda: (lambda x: x.view_as(x.t()).t()), "inside another dim"),
    "batch-size-as-a-tensor": (lambda: (lambda x: x * torch.tensor(x.shape[0])), "computed from the batch size"),
    "batch-size-as-alpha": (lambda: (lambda x: torch.add(x, x, alpha=x.shape[0])), "as 'alpha'"),
    "batch-size-as-a-start": (lambda: (lambda x: x.narrow(1, x.shape[0] % 4, 4)), "as 'start'"),
    "batch-size-as-a-correction": (lambda: (lambda x: x.std(1, correction=x.shape[0] % 3, keepdim=True)),
                                   "as 'correction'"),
    "attention-dropout": (lambda: (lambda x: F.scaled_dot_product_attention(*(x[:, None],) * 3, dropout_p=0.5)),
                          "random numbers"),
    "random-fill": (lambda: (lambda x: x + torch.empty(1, D).exponential_()), "random numbers"),
    "gather-of-one-row": (lambda: (lambda x: x + torch.gather(x, 1, torch.zeros(1, D, dtype=torch.long))),
                          "an index that holds none"),
    "where-as-nonzero": (lambda: (lambda x: x[torch.where(x > 0)]), "several tensors"),
    "input-written": (lambda: (lambda x: x.add_(1) * 2), "writes into the input"),
    "unknown-op": (lambda: (lambda x: torch.fft.fft(x, dim=-1).real), "not known to keep rows apart"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_each_op_that_mixes_rows_breaks_the_proof_and_says_why(name):
    make_model, why = NEGATIVE[name]
    torch.manual_seed(0)
    proof = proof_of(make_model(), torch.randn(5, D))
    assert not proof.ok
    assert why in proof.reason, (proof.node, proof.reason)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_transformers_models_as_users_run_them_are_proven(name):
    """transformers' sdpa models at inference, dynamic batch: every row its own; padded rows change no logit."""
    from kp_compiler.testing import hf

    torch.manual_seed(0)
    model, vocab = hf.build(name, "tiny", attn="sdpa")
    model.eval()
    ids = torch.randint(0, vocab, (3, 12))
    proof = proof_of(lambda i: model(i).logits, ids)
    assert proof.ok, (proof.node, proof.reason)
    assert proof.outputs == [0]
    with torch.no_grad():
        want = model(ids).logits
        got = model(torch.cat([ids, torch.randint(0, vocab, (2, 12))])).logits[:3]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_transformers_grouped_mm_experts_sort_tokens_across_the_batch():
    """Qwen3-MoE's default experts sort every token by expert: not proven (the routed op rewrite is per token)."""
    from kp_compiler.testing import hf

    torch.manual_seed(0)
    model, vocab = hf.build("qwen3_moe", "tiny", attn=None, experts=None)
    model.eval()
    proof = proof_of(lambda i: model(i).logits, torch.randint(0, vocab, (3, 12)))
    assert not proof.ok and "sort over dim 0" in proof.reason


def test_a_rule_that_fails_makes_an_unproven_graph_not_a_crash(monkeypatch):
    from kp_compiler.core import row_rules

    def broken_rule(p, node):
        raise TypeError("surprise")
    monkeypatch.setitem(row_rules.RULES, "linear", broken_rule)
    proof = proof_of(nn.Linear(D, D), torch.randn(5, D))
    assert not proof.ok and "could not be analysed (TypeError: surprise)" in proof.reason


def test_a_bound_on_the_batch_is_an_assert_or_a_range_buckets_must_respect():
    """``torch._check(B <= 6)``: an assert in the graph (refused) on torch 2.13, a range on the symbol on 2.9
    (recorded, so that no bucket passes it)."""
    proof = proof_of(lambda x: (torch._check(x.shape[0] <= 6), x * 2)[1], torch.randn(5, D))
    assert (not proof.ok and "computed from the batch size" in proof.reason) or proof.max_batch == 6


class Flex(nn.Module):
    """FlexAttention as torch's docs write it: a block mask made once (broadcast over batch and heads, unless
    ``mask_batch``) and a score_mod, over heads split from the features."""

    def __init__(self, score_mod=None, mask_mod=None, mask_batch=None, S=16):
        super().__init__()
        from torch.nn.attention.flex_attention import create_block_mask

        self.S, self.score_mod = S, score_mod
        self.block_mask = create_block_mask(mask_mod or (lambda b, h, q, kv: kv <= q), mask_batch, None, S, S,
                                            device="cpu", BLOCK_SIZE=16)

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention

        B = x.shape[0]
        q = x.view(B, self.S, 2, D // 2).transpose(1, 2)
        out = flex_attention(q, q * 0.5, q + 1, score_mod=self.score_mod, block_mask=self.block_mask)
        return out.transpose(1, 2).reshape(B, self.S, D)


def _causal(b, h, q, kv):
    return kv <= q


def _relative(score, b, h, q, kv):
    return score + (q - kv) * 0.1


def test_flex_attention_with_a_broadcast_block_mask_is_proven_and_padding_changes_no_row():
    import warnings

    torch.manual_seed(0)
    model, x = Flex(_relative), torch.randn(3, 16, D)
    proof = proof_of(model, x)
    assert proof.ok, (proof.node, proof.reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when run without torch.compile
        padding_changes_nothing(model, x)


@pytest.mark.parametrize("model,why", [
    (lambda: Flex(lambda s, b, h, q, kv: s + b), "score_mod reads the batch index b"),
    (lambda: Flex(mask_mod=lambda b, h, q, kv: (kv <= q) | (b > 2)), "mask_mod reads the batch index b"),
    (lambda: Flex(mask_batch=3), "a table per batch element"),
], ids=["score-mod-reads-b", "mask-mod-reads-b", "block-mask-per-batch"])
def test_flex_attention_that_can_see_other_rows_is_not_proven(model, why):
    proof = proof_of(model(), torch.randn(3, 16, D))
    assert not proof.ok and why in proof.reason, (proof.node, proof.reason)


def test_flex_attention_with_its_block_mask_made_in_the_graph_at_symbolic_lengths_is_proven():
    """``create_block_mask`` inside the model, the sequence length dynamic too: the block-mask tuple then holds
    SymInt lengths beside its tables (the rule once called ``.dim()`` on them)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def fn(x):
        B, S = x.shape[0], x.shape[1]
        q = x.view(B, S, 2, D // 2).transpose(1, 2)
        bm = create_block_mask(_causal, None, None, S, S, device="cpu", BLOCK_SIZE=16)  # torch 2.9: no lambda
        return flex_attention(q, q * 0.5, q + 1, block_mask=bm).transpose(1, 2).reshape(B, S, D)
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"] = canonicalize(gm, example_inputs)[0]
        return gm.forward
    torch._dynamo.reset()
    x = torch.randn(3, 32, D)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(x)
    proof = prove_rows(seen["gm"].graph, batch_symbol(seen["gm"]))
    assert proof.ok, (proof.node, proof.reason)
