"""Masks that read a per-row tensor (``data_masks.py``): padding and packed documents, from transformers' own code.

transformers' sdpa path hands SDPA ``causal & padding[b, kv_idx]`` for a
padded batch, and for packed sequences (position ids that restart, no cache)
``(pos[b, kv_idx] <= pos[b, q_idx]) & (ids[b, q_idx] == ids[b, kv_idx])``.
On the CPU flex runs for inference only and only when forced
(``attention_kernel="flex"``); gradients are checked on the default path,
where the lifted mask keeps SDPA.
"""

import pytest
import torch

from kp_compiler.testing import hf
from tests.utils import compile_and_collect, filecheck, input_grads

tf_masks = pytest.importorskip("transformers.masking_utils")

B, H, L, D = 2, 4, 256, 16


def pass_record(records, name):
    (rec,) = [p for r in records for p in r.passes if p.name == name]
    return rec


class PaddedSdpa(torch.nn.Module):
    """transformers' causal-and-padding mask: reads the caller's attention_mask."""

    def forward(self, q, k, v, padding):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  attention_mask=padding, allow_is_causal_skip=False, device=q.device)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def padded_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    left = torch.randint(1, L // 2, (B,), generator=g)  # left padding, a different length per row and call
    padding = torch.arange(L)[None, :] >= left[:, None]
    return [q, k, v, padding]


def test_padding_is_lifted_to_flex_reading_the_mask(tmp_path):
    fn = PaddedSdpa()
    with torch.no_grad():
        compiled, _, records = compile_and_collect(fn, padded_inputs(0), attention_kernel="flex", strict=True,
                                                   dump_dir=str(tmp_path))
        assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-data-mask": 1}
        assert pass_record(records, "attention-kernels").by_rule == {"flex": 1}
        for seed in (1, 2):  # fresh paddings: the mask is read per call, padded query rows included
            inputs = padded_inputs(seed)
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    filecheck("CHECK: scaled_dot_product_attention{{.*}}# mask_mod: (kv_idx <= q_idx) & l_padding_[b, kv_idx] "
              "(reads l_padding_)\n", (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text())
    filecheck("CHECK-NOT: scaled_dot_product_attention\n"
              "CHECK: higher_order.flex_attention(%l_q_, %l_k_, %l_v_, {{.*}}, (), (%l_padding_))\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


def test_padding_gradients_equal_eager():
    fn = PaddedSdpa()
    compiled, _, records = compile_and_collect(fn, [t.requires_grad_(t.is_floating_point()) for t in padded_inputs(0)])
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-data-mask": 1}
    for seed in (1, 2):
        q, k, v, padding = padded_inputs(seed)
        out, got = input_grads(lambda q, k, v: compiled(q, k, v, padding), [q, k, v])
        ref, want = input_grads(lambda q, k, v: fn(q, k, v, padding), [q, k, v])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        from kp_compiler.testing.compare import assert_same_grads
        assert_same_grads(got, want, rtol=1e-4, atol=1e-5)


def test_transformers_packed_sequences_lift_to_document_reads(tmp_path):
    """Llama, position ids restarting at 12 and 20 (three packed documents), no cache: transformers builds
    the mask from the positions and the document ids it derives; both are read per call."""
    model, vocab = hf.build("llama3", "tiny", attn="sdpa")

    def logits(ids, pos):
        return model(ids, position_ids=pos, use_cache=False).logits

    def positions(cuts):
        return torch.cat([torch.arange(n) for n in cuts])[None].expand(2, sum(cuts)).clone()

    ids = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        compiled, out, records = compile_and_collect(logits, [ids, positions((12, 8, 12))], attention_kernel="flex",
                                                     dump_dir=str(tmp_path))
        assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-data-mask": 2}
        assert pass_record(records, "attention-kernels").by_rule == {"flex": 2}
        torch.testing.assert_close(out, logits(ids, positions((12, 8, 12))), rtol=1e-4, atol=1e-4)
        for cuts in ((5, 27), (16, 16)):  # other documents, same compile
            ids = torch.randint(0, vocab, (2, 32))
            torch.testing.assert_close(compiled(ids, positions(cuts)), logits(ids, positions(cuts)),
                                       rtol=1e-4, atol=1e-4)
    # transformers 5.24 compares positions (l_pos_[b, kv_idx] <= l_pos_[b, q_idx]), 5.17 indices (kv_idx <= q_idx)
    filecheck("CHECK: scaled_dot_product_attention{{.*}}# mask_mod: ({{.*}} <= {{.*}}) & "
              "(cumsum[b, q_idx] == cumsum[b, kv_idx])\n",
              (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text())


def _manual(read):
    """SDPA with ``causal & read(padding, b, q, kv)``, the indices built as transformers builds them."""
    def fn(q, k, v, padding):
        b = torch.arange(q.shape[0])[:, None, None, None]
        i = torch.arange(q.shape[2])[None, None, :, None]
        j = torch.arange(k.shape[2])[None, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & read(padding, b, i, j))
    return fn


@pytest.mark.parametrize("name, read", [
    ("negative index (kv - 1 at kv = 0)", lambda p, b, i, j: p[b, j - 1]),
    ("float data", lambda p, b, i, j: p.float()[b, j] > 0.5),
    ("additive mask", None),
])
def test_reads_not_proven_are_left_alone(name, read):
    q, k, v, padding = padded_inputs(0)
    if read is None:  # 0 / -inf: a row with no key gets uniform weights from SDPA, zeros from flex
        def fn(q, k, v, padding):
            keep = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                      attention_mask=padding, allow_is_causal_skip=False, device=q.device)
            bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        fn = _manual(read)
    with torch.no_grad():
        _, out, records = compile_and_collect(fn, [q, k, v, padding], attention_kernel="flex")
    assert "sdpa-data-mask" not in pass_record(records, "attention-to-sdpa").by_rule, name
    torch.testing.assert_close(out, fn(q, k, v, padding), rtol=1e-5, atol=1e-5)


def test_a_read_in_bounds_by_index_arithmetic_is_lifted():
    """The same manual spelling with an in-bounds read is lifted: the refusals above are the reads, not the spelling."""
    fn = _manual(lambda p, b, i, j: p[b, j])
    with torch.no_grad():
        compiled, out, records = compile_and_collect(fn, padded_inputs(0), attention_kernel="flex")
        assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-data-mask": 1}
        inputs = padded_inputs(3)
        torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)


def test_transformers_packed_sequences_gradients_equal_eager():
    """The training step packed data is for: the lifted mask keeps SDPA by default, and the parameters'
    gradients equal eager's."""
    from kp_compiler.testing.compare import assert_same_grads, grads_of

    model, vocab = hf.build("llama3", "tiny", attn="sdpa")
    pos = torch.cat([torch.arange(n) for n in (12, 8, 12)])[None].expand(2, 32).clone()

    def loss(m, ids):
        return m(input_ids=ids, position_ids=pos, use_cache=False).logits.float().square().mean()

    compiled = torch.compile(lambda ids: loss(model, ids), backend="kernelpytorch")
    from kp_compiler.core.report import collect

    ids = torch.randint(0, vocab, (2, 32))
    with collect() as records:
        compiled(ids).backward()
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-data-mask": 2}
    got = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss(model, ids).backward()
    want = grads_of(model.named_parameters())
    assert_same_grads(got, want, rtol=1e-4, atol=1e-5)
