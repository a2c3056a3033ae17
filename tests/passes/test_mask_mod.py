"""Lifting index-arithmetic masks into FlexAttention mask_mods."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from bench.cases import attention as cases
from kp_compiler.passes.attention import match as attention
from kp_compiler.passes.attention.mask_mod import lift_mask_mod

L = 64


def keep_mask_of(fn, length=L):
    """The keep-mask node the attention matcher finds in ``fn``'s canonical graph."""
    inputs = [torch.randn(1, 2, length, 8) for _ in range(3)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        gm = make_fx(fn, pre_dispatch=True)(*[mode.from_tensor(t) for t in inputs])
    (softmax,) = [n for n in gm.graph.nodes if n.target in attention.SOFTMAX]
    att = attention.match(softmax)
    assert att is not None
    return att.keep_mask


def dense(mask_mod):
    q = torch.arange(L)[:, None]
    kv = torch.arange(L)[None, :]
    return mask_mod(0, 0, q, kv).expand(L, L)


i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
EXPECTED = {
    "causal": (cases.causal, j <= i),
    "sliding-window-16": (cases.make_sliding_window(16), (j <= i) & (i - j < 16)),
    "documents-of-8": (cases.make_documents(8), (i // 8) == (j // 8)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lifted_mask_mod_equals_the_mask(name):
    fn, expected = EXPECTED[name]
    mask_mod = lift_mask_mod(keep_mask_of(fn))
    assert mask_mod is not None
    assert torch.equal(dense(mask_mod), expected)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lifted_mask_mod_drives_flex_attention(name):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn, _ = EXPECTED[name]
    mask_mod = lift_mask_mod(keep_mask_of(fn))
    block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, 2, L, 8) for _ in range(3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when run without torch.compile
        out = flex_attention(q, k, v, block_mask=block_mask, scale=8 ** -0.5)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_masks_reading_data_are_not_lifted():
    """A mask that depends on a tensor input (not index arithmetic) has no mask_mod here."""
    def fn(q, k, v):
        keep = (q.sum(-1, keepdim=True) > 0).expand(-1, -1, -1, L)
        return cases.naive(q, k, v, mask=keep)

    assert lift_mask_mod(keep_mask_of(fn)) is None


def test_describe_spells_the_lifted_mask():
    from kp_compiler.passes.attention.mask_mod import describe

    texts = {name: describe(lift_mask_mod(keep_mask_of(fn))) for name, (fn, _) in EXPECTED.items()}
    assert texts == {
        "causal": "kv_idx <= q_idx",
        "sliding-window-16": "(kv_idx <= q_idx) & (q_idx - kv_idx < 16)",
        "documents-of-8": "q_idx // 8 == kv_idx // 8",
    }


def test_size_one_dims_read_index_zero():
    """``arange(1)`` on the query axis broadcasts one row to all: q_idx must not appear."""
    from kp_compiler.passes.attention.mask_mod import describe

    def fn(q, k, v):
        keep = torch.arange(1)[:, None] <= torch.arange(L)[None, :]
        return cases.naive(q, k, v, mask=keep.expand(L, L))

    mask_mod = lift_mask_mod(keep_mask_of(fn), L, L)
    assert describe(mask_mod) == "kv_idx >= 0"  # Python reflects 0 <= x
    assert bool(dense(mask_mod).all())


def test_hugging_face_4d_causal_mask_is_lifted():
    """transformers v5 builds ``kv <= q`` from arange through three unsqueezes to [1, 1, L, S]."""
    def fn(q, k, v):
        i = torch.arange(L)[None, None, :, None]
        j = torch.arange(L)[None, None, None, :]
        keep = (j <= i).expand(q.shape[0], -1, L, L)
        return cases.naive(q, k, v, mask=keep)

    from kp_compiler.passes.attention.mask_mod import describe

    assert describe(lift_mask_mod(keep_mask_of(fn), L, L)) == "kv_idx <= q_idx"


def test_masks_varying_over_heads_are_not_lifted():
    def fn(q, k, v):
        h = torch.arange(2)[:, None, None]
        keep = (torch.arange(L)[None, None, :] + h) >= torch.arange(L)[None, :, None]
        return cases.naive(q, k, v, mask=keep)

    assert lift_mask_mod(keep_mask_of(fn), L, L) is None


def test_the_grid_proof_rejects_a_wrong_lift():
    from kp_compiler.passes.attention.mask_mod import _same_on_grid

    keep = keep_mask_of(cases.causal)
    assert _same_on_grid(keep, lambda b, h, q, kv: kv <= q, L, L)
    assert not _same_on_grid(keep, lambda b, h, q, kv: kv < q, L, L)


def test_a_one_by_one_mask_lifts_to_a_tensor_valued_mask_mod():
    """Decode at length 1: the causal grid is one kept cell, a constant; flex's vmap needs a tensor back
    (on the H200 a Python ``True`` made the pass roll back)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = lift_mask_mod(keep_mask_of(cases.causal, 1), 1, 1)
    assert mask_mod is not None
    kept = mask_mod(0, 0, torch.tensor(0), torch.tensor(0))
    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.bool and bool(kept)
    block_mask = create_block_mask(mask_mod, None, None, 1, 1, device="cpu")
    assert block_mask.to_dense().sum() == 1


def test_a_fake_buffer_is_not_taken_for_a_lower_triangle():
    """Dynamo's DDP optimizer compiles the pieces it splits on fake inputs: the value check says no (it raised
    on the fake tensor before, and the whole attention pass was rolled back)."""
    from kp_compiler.passes.attention.masks import holds_lower_triangle

    tril = torch.tril(torch.ones(1, 1, 8, 8))
    assert holds_lower_triangle(tril) and not holds_lower_triangle(torch.ones(1, 1, 8, 8))
    assert not holds_lower_triangle(FakeTensorMode().from_tensor(tril))
