"""FlexAttention with symbolic lengths: block masks built per length at run time (``ops/block_masks.py``).

On the CPU flex runs only for inference and only under ``attention_kernel="flex"``; the GPU default takes it
(``bench/results``). Lengths are above 128 so every one of them has more than one block (see
``flex.GUARDS_WHY``: one block and several compile apart).
"""

import re

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from kp_compiler.core.report import collect
from kp_compiler.ops import block_masks
from kp_compiler.passes.attention.proofs import keeps_diagonal
from kp_compiler.testing import hf
from tests.passes.test_given_sdpa import MaskedSdpa, window
from tests.utils import filecheck

LENGTHS = (136, 200, 264)

MASKS = {
    "causal": lambda b, h, q, kv: kv <= q,
    "window": lambda b, h, q, kv: (kv <= q) & (q - kv < 100),
    "chunked": lambda b, h, q, kv: (q // 64) == (kv // 64),
    "chunked-causal": lambda b, h, q, kv: ((q // 64) == (kv // 64)) & (kv <= q),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("L,S", [(24, 24), (300, 300), (128, 256), (256, 130), (1000, 1000)])
def test_runtime_block_mask_equals_create_block_mask(name, L, S):
    block_masks.register(f"test-{name}", MASKS[name])
    got = torch.ops.kp.flex_block_mask(f"test-{name}", L, S, torch.device("cpu"))
    want = create_block_mask(MASKS[name], None, None, L, S, device="cpu")
    assert len(got) == len(block_masks.FIELDS)
    for field, tensor in zip(block_masks.FIELDS, got):
        assert torch.equal(tensor, getattr(want, field).to(torch.int32)), field


def test_cache_is_bounded_and_calls_get_fresh_tensors(monkeypatch):
    monkeypatch.setattr(block_masks, "CACHE_SIZE", 2)
    monkeypatch.setattr(block_masks, "_CACHE", type(block_masks._CACHE)())
    block_masks.register("test-causal", MASKS["causal"])
    first = torch.ops.kp.flex_block_mask("test-causal", 300, 300, torch.device("cpu"))
    again = torch.ops.kp.flex_block_mask("test-causal", 300, 300, torch.device("cpu"))
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(first, again))
    first[1].fill_(-1)  # a caller (or Inductor reusing the buffer) writing into its copy leaves the cache alone
    assert torch.equal(torch.ops.kp.flex_block_mask("test-causal", 300, 300, torch.device("cpu"))[1], again[1])
    for L in (400, 500, 600):
        torch.ops.kp.flex_block_mask("test-causal", L, L, torch.device("cpu"))
    assert len(block_masks._CACHE) == 2


def test_an_unregistered_mask_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no mask registered"):
        torch.ops.kp.flex_block_mask("never registered", 64, 64, torch.device("cpu"))


@pytest.mark.parametrize("mask,kept", [
    (lambda b, h, q, kv: kv <= q, True),
    (lambda b, h, q, kv: (kv <= q) & (q - kv < 1024), True),
    (lambda b, h, q, kv: (q // 64) == (kv // 64), True),
    (lambda b, h, q, kv: ~(kv > q), True),
    (lambda b, h, q, kv: abs(q - kv) <= 3, True),
    (lambda b, h, q, kv: kv < q, False),  # row 0 keeps nothing
    (lambda b, h, q, kv: q < 10, False),  # rows from 10 on keep nothing
    (lambda b, h, q, kv: (kv <= q) & (q - kv < 0), False),
    (lambda b, h, q, kv: (q / 2) >= (kv / 2), False),  # float division: not modelled, so not proven
], ids=["causal", "window", "chunked", "not-above", "band", "strict", "prefix", "empty-window", "float"])
def test_keeps_diagonal_proofs(mask, kept):
    assert keeps_diagonal(mask) is kept


def _kernels(records):
    return [p for r in records for p in r.passes if p.name == "attention-kernels"]


def chunks_of_8(q):
    """Causal within chunks of 8 (transformers' chunked mask reads a left-padding tensor: static lengths only)."""
    return lambda batch_idx, head_idx, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx // 8 == kv_idx // 8)


@pytest.mark.parametrize("mask_function", [window, chunks_of_8], ids=["window", "chunked"])
def test_symbolic_lengths_run_flex_with_one_compile(mask_function, tmp_path):
    fn = MaskedSdpa(mask_function)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True,
                             options={"attention_kernel": "flex", "dump_dir": str(tmp_path)})
    with torch.no_grad(), collect() as records:
        for L in LENGTHS:
            q, k, v = torch.randn(2, 4, L, 16), torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(records) == 1, "one compile for three lengths"
    (kernels,) = _kernels(records)
    assert kernels.by_rule == {"flex": 1}
    assert any("shape guards by design" in n for n in kernels.notes), kernels.notes
    # the only size pinned to a number is the head dim (16, by design): no length is specialized
    pinned = [re.match(r"Eq\(s\d+, (\d+)\)", g["guard"]) for r in records for g in r.guards_added]
    assert [m.group(1) for m in pinned if m] == ["16"], [g["guard"] for r in records for g in r.guards_added]
    filecheck("CHECK: kp.flex_block_mask.default('{{.*}}kv_idx{{.*}}', %sym_size_int{{.*}}) : "
              "(i32[1, 1, ((s0 + 127)//128)], i32[1, 1, ((s0 + 127)//128), ((s0 + 127)//128)]\n"
              "CHECK-NOT: expand.default\n"  # flex reads the kv heads unrepeated (GQA)
              "CHECK: torch.ops.higher_order.flex_attention(%l_q_, {{%l_k_|%slice_[0-9]+}}, {{%l_v_|%slice_[0-9]+}}, "
              "{{.*}}(%sym_size_int{{.*}}, %getitem, %getitem_1, "
              "%getitem_2, %getitem_3, %getitem_4, %getitem_5, %getitem_6, %getitem_7,\n"
              "CHECK-NOT: scaled_dot_product_attention\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


def test_a_mask_with_an_empty_row_stays_sdpa_with_symbolic_lengths():
    """``kv_idx < q_idx`` leaves row 0 empty (NaN in eager, zeros in flex): no proof, no flex."""
    def strict(q):
        return lambda batch_idx, head_idx, q_idx, kv_idx: kv_idx < q_idx

    fn = MaskedSdpa(strict)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True, options={"attention_kernel": "flex"})
    with torch.no_grad(), collect() as records:
        for L in LENGTHS:
            q, k, v = torch.randn(2, 4, L, 16), torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert all(p.by_rule == {} for p in _kernels(records))


def test_transformers_mistral_sdpa_window_with_dynamic_lengths():
    """transformers' sdpa path hands SDPA its sliding-window mask; with every dim symbolic it still lifts to
    flex, and three lengths (all past the window) run on one compile with logits equal to eager."""
    model, vocab = hf.build("mistral", "tiny", attn="sdpa")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", dynamic=True, options={"attention_kernel": "flex"})
    with torch.no_grad(), collect() as records:
        for T in LENGTHS:
            ids = torch.randint(0, vocab, (2, T))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(records) == 1
    (kernels,) = _kernels(records)
    assert kernels.by_rule.get("flex", 0) == model.config.num_hidden_layers


def test_softcap_without_a_mask_on_symbolic_lengths_is_left_alone():
    """No lifted mask means no run-time block tables: the softcapped attention keeps its eager math (and the
    report says why) instead of flex with a block mask traced on symbolic lengths."""
    def softcapped(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = torch.tanh(s / 30.0) * 30.0
        return torch.softmax(s, dim=-1) @ v

    torch._dynamo.reset()
    compiled = torch.compile(softcapped, backend="kernelpytorch", dynamic=True, options={"attention_kernel": "flex"})
    with torch.no_grad(), collect() as records:
        for L in LENGTHS:
            q, k, v = (torch.randn(2, 4, L, 16) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), softcapped(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(records) == 1
    (kernels,) = _kernels(records)
    assert kernels.by_rule == {}
    assert any("symbolic lengths and no mask" in n for n in kernels.notes), kernels.notes
