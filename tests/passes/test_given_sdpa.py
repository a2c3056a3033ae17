"""SDPA calls the model makes itself, with a mask built by index arithmetic (transformers' sdpa path).

The masks come from transformers' own masking code (``masking_utils``), the
way its ``sdpa`` attention builds them, and from whole transformers models.
"""

import pytest
import torch

from kp_compiler.testing import hf
from kp_compiler.testing.compare import assert_same_grads
from tests.utils import compile_and_collect, filecheck, input_grads, loss_and_grads

tf_masks = pytest.importorskip("transformers.masking_utils")

B, H, KV, L, D = 2, 4, 2, 32, 16


def pass_record(records, name):
    (rec,) = [p for r in records for p in r.passes if p.name == name]
    return rec


class MaskedSdpa(torch.nn.Module):
    """One layer of transformers' sdpa path: ``sdpa_mask`` from a mask function, repeat_kv, SDPA."""

    def __init__(self, mask_function, float_mask=False):
        super().__init__()
        self.mask_function, self.float_mask = mask_function, float_mask

    def forward(self, q, k, v):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  mask_function=self.mask_function(q), allow_is_causal_skip=False,
                                  device=q.device)
        if self.float_mask:  # older transformers and user code: 0 where kept, finfo.min elsewhere
            mask = torch.where(mask, torch.tensor(0.0), torch.finfo(q.dtype).min)
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, v.shape[2], v.shape[3])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)


def causal(q):
    return tf_masks.causal_mask_function


def window(q):
    return tf_masks.sliding_window_causal_mask_function(8)


def chunked(q):
    return tf_masks.chunked_causal_mask_function(8, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def qkv(requires_grad=False, length=L):
    shapes = [(B, H, length, D), (B, KV, length, D), (B, KV, length, D)]
    return [torch.randn(s, requires_grad=requires_grad) for s in shapes]


def check_grads(fn, compiled):
    inputs = qkv()
    out, got = input_grads(compiled, inputs)
    ref, want = input_grads(fn, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "finfo-min"])
def test_causal_mask_becomes_is_causal_with_gqa(float_mask, tmp_path):
    fn = MaskedSdpa(causal, float_mask)
    compiled, out, records = compile_and_collect(fn, qkv(requires_grad=True), dump_dir=str(tmp_path))
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-causal": 1}
    check_grads(fn, compiled)
    text = (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text()
    filecheck("CHECK: scaled_dot_product_attention.default(%l_q_, %l_k_, %l_v_, scale=0.25, is_causal=True, "
              "enable_gqa=True){{.*}}# attn_mask proven causal: is_causal\n"
              "CHECK-NOT: expand\n", text[text.index("scaled_dot"):])


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "finfo-min"])
def test_a_mask_keeping_every_key_is_dropped(float_mask, tmp_path):
    """Decode at length 1 (transformers 5.17 still builds the 1 x 1 mask): plain SDPA, GQA by enable_gqa.
    On the H200 the mask had gone to flex_attention, which compiled a graph per batch size."""
    fn = MaskedSdpa(causal, float_mask)
    compiled, out, records = compile_and_collect(fn, qkv(requires_grad=True, length=1), dump_dir=str(tmp_path))
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-no-mask": 1}
    inputs = qkv(length=1)
    got, want = input_grads(compiled, inputs), input_grads(fn, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_same_grads(got[1], want[1], rtol=1e-4, atol=1e-5)
    text = (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text()
    filecheck("CHECK: scaled_dot_product_attention.default(%l_q_, %l_k_, %l_v_, scale=0.25, enable_gqa=True)"
              "{{.*}}# attn_mask proven to keep every key: dropped\n", text[text.index("scaled_dot"):])


MASK_MODS = {
    "window": (window, "(kv_idx > q_idx - 8) & (kv_idx <= q_idx)"),
    "chunked": (chunked, "(kv_idx <= q_idx) & (q_idx // 8 == kv_idx // 8)"),
}


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_structured_mask_is_lifted_and_runs_on_flex(name, tmp_path):
    mask_function, text = MASK_MODS[name]
    fn = MaskedSdpa(mask_function)
    with torch.no_grad():
        compiled, out, records = compile_and_collect(fn, qkv(), attention_kernel="flex", strict=True,
                                                     dump_dir=str(tmp_path))
        assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-mask_mod": 1}
        assert pass_record(records, "attention-kernels").by_rule == {"flex": 1}
        for _ in range(2):
            inputs = qkv()
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    filecheck(f"CHECK: scaled_dot_product_attention{{{{.*}}}}# mask_mod: {text}\n",
              (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text())
    filecheck("CHECK-NOT: scaled_dot_product_attention\n"
              "CHECK: torch.ops.higher_order.flex_attention(%l_q_, %l_k_, %l_v_\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


def test_flex_kernel_options_given_reach_flex(tmp_path):
    """``flex_kernel_options`` is passed to the flex call as given (in its options, and in the dump's note)."""
    fn = MaskedSdpa(window)
    with torch.no_grad():
        compiled, _, _ = compile_and_collect(fn, qkv(), attention_kernel="flex", dump_dir=str(tmp_path),
                                             flex_kernel_options={"WRITE_DQ": False})
        inputs = qkv()
        torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    # WRITE_DQ defaults to True: False in the flex call's options is the option arriving, not a default
    filecheck("CHECK: higher_order.flex_attention({{.*}}{'WRITE_DQ': False,\n"
              "CHECK: # flex_attention output{{.*}}kernel_options: {'WRITE_DQ': False}\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_structured_mask_gradients_equal_eager(name):
    fn = MaskedSdpa(MASK_MODS[name][0])
    compiled, _, records = compile_and_collect(fn, qkv(requires_grad=True))
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-mask_mod": 1}
    check_grads(fn, compiled)


def test_a_mask_from_the_caller_is_left_alone():
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = torch.ones(L, L, dtype=torch.bool).tril()  # causal, but an input: it may change between calls
    fn = torch.nn.functional.scaled_dot_product_attention
    _, out, records = compile_and_collect(lambda q, k, v, m: fn(q, k, v, attn_mask=m), [q, k, v, mask])
    assert pass_record(records, "attention-to-sdpa").matches == 0
    torch.testing.assert_close(out, fn(q, k, v, attn_mask=mask))


def test_an_anti_causal_mask_is_not_called_causal():
    def fn(q, k, v):
        i = torch.arange(q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] >= i[:, None])

    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    _, out, records = compile_and_collect(fn, [q, k, v])
    assert pass_record(records, "attention-to-sdpa").by_rule.get("sdpa-causal", 0) == 0
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-5)


def hf_step(name, attn, compiled_or_model, ids, train):
    if not train:
        with torch.no_grad():
            return compiled_or_model(ids).logits
    return compiled_or_model(ids, labels=ids, use_cache=False)


@pytest.mark.parametrize("name,kind", [("mistral", "sdpa-mask_mod"), ("llama", "sdpa-causal")])
def test_transformers_sdpa_models_training_step(name, kind):
    """Mistral's sliding window stays a tagged mask; Llama with no cache (transformers 5.24 detects packed
    sequences from its own positions, so SDPA gets a mask) is proven causal. Loss and gradients equal eager."""
    model, vocab = hf.build(name, "tiny", attn="sdpa")
    model.train()
    ids = torch.randint(0, vocab, (2, 32))
    compiled, out, records = compile_and_collect(lambda i: model(i, labels=i, use_cache=False), [ids])
    rec = pass_record(records, "attention-to-sdpa")
    assert rec.by_rule.get(kind, 0) == 2 or (kind == "sdpa-causal" and rec.matches == 0 and _causal_skipped()), rec
    loss, got = loss_and_grads(model, lambda i: compiled(i).loss, ids)
    ref, want = loss_and_grads(model, lambda i: model(i, labels=i, use_cache=False).loss, ids)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, want, rtol=1e-4, atol=1e-5)


def _causal_skipped():
    """Older transformers (5.17) hand SDPA is_causal for Llama with no cache: nothing to lift then."""
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 20)


def test_transformers_mistral_sdpa_inference_on_flex(tmp_path):
    model, vocab = hf.build("mistral", "tiny", attn="sdpa")
    ids = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        compiled, out, records = compile_and_collect(model, [ids], attention_kernel="flex",
                                                     dump_dir=str(tmp_path))
        assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-mask_mod": 2}
        assert pass_record(records, "attention-kernels").by_rule == {"flex": 2}
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        ids = torch.randint(0, vocab, (2, 32))
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    filecheck("CHECK: scaled_dot_product_attention{{.*}}# mask_mod: (kv_idx > q_idx - 16) & (kv_idx <= q_idx)\n",
              (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text())


def test_a_mask_from_a_random_op_is_not_proven_by_value():
    """rand() < 2 is always true, so this grid equals causal on every call, but a random op's value is not
    a fact about the next call: the by-value proof refuses it."""
    def fn(q, k, v):
        keep = (torch.rand(q.shape[2], k.shape[2]) < 2.0) & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    _, out, records = compile_and_collect(fn, [q, k, v])
    assert pass_record(records, "attention-to-sdpa").matches == 0
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_dropout_keeps_a_lifted_mask_off_flex():
    """SDPA's dropout_p arrives positionally from make_fx; flex has no dropout, so the table must see it."""
    class Dropped(MaskedSdpa):
        def forward(self, q, k, v):
            mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                      mask_function=self.mask_function(q), allow_is_causal_skip=False,
                                      device=q.device)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.5)

    q = torch.randn(B, H, L, D)
    with torch.no_grad():
        _, out, records = compile_and_collect(Dropped(window), [q, q, q], attention_kernel="flex")
    assert pass_record(records, "attention-to-sdpa").by_rule == {"sdpa-mask_mod": 1}
    assert pass_record(records, "attention-kernels").matches == 0
    assert out.shape == q.shape and torch.isfinite(out).all()
