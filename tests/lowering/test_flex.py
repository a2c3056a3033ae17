"""FlexAttention spliced in for lifted masks (CPU: Inductor's flex kernel, inference only)."""

import math

import pytest
import torch

from bench.cases import attention as cases
from kp_compiler.passes.attention import flex
from tests.utils import compile_and_collect, filecheck

L, D = 64, 16


def qkv(requires_grad=False, L=L):
    return [torch.randn(1, 2, L, D, requires_grad=requires_grad) for _ in range(3)]


def finfo_min_window(q, k, v):
    i, j = cases._positions(q)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~((j <= i) & (i - j < 8)), torch.finfo(q.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def tensor_constant_bias(q, k, v):
    """transformers 5.17's eager mask: where(keep, torch.tensor(0.0), finfo.min) added to the scores
    (Dynamo records the 0 as a tensor constant, not as a number)."""
    i, j = cases._positions(q)
    keep = (j <= i) & (i - j < 8)
    bias = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(scores, dim=-1) @ v


def strictly_causal(q, k, v):  # row 0 attends to nothing: eager gives NaN there
    i, j = cases._positions(q)
    return cases.naive(q, k, v, mask=j < i)


def kernels_pass(records):
    (rec,) = [p for p in records[0].passes if p.name == "attention-kernels"]
    return rec


def sdpa_note(path):
    return (path / "graph-000" / "03-attention-kernels.txt").read_text()


FLEX_CASES = {
    "sliding-window": (cases.make_sliding_window(16), "(kv_idx <= q_idx) & (q_idx - kv_idx < 16)"),
    "documents": (cases.make_documents(8), "q_idx // 8 == kv_idx // 8"),
    "finfo-min-fill": (finfo_min_window, "(kv_idx <= q_idx) & (q_idx - kv_idx < 8)"),
    "tensor-constant-bias": (tensor_constant_bias, "(kv_idx <= q_idx) & (q_idx - kv_idx < 8)"),
    "alibi": (cases.alibi, "kv_idx <= q_idx"),  # plus a score_mod for the slopes
}


@pytest.mark.parametrize("name", sorted(FLEX_CASES))
def test_structured_mask_runs_on_flex(name, tmp_path):
    fn, text = FLEX_CASES[name]
    inputs = qkv()
    with torch.no_grad():
        compiled, out, records = compile_and_collect(fn, inputs, attention_kernel="flex", strict=True,
                                                     dump_dir=str(tmp_path))
        torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)
        rec = kernels_pass(records)
        assert rec.status == "ok" and rec.by_rule == {"flex": 1}
        for _ in range(2):  # fresh inputs, same compiled graph
            inputs = qkv()
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    filecheck(
        f"CHECK: scaled_dot_product_attention{{{{.*}}}}# mask_mod: {text}\n", (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text()
    )
    filecheck(
        "CHECK: after attention-kernels | status ok | matches 1\n"
        "CHECK-NOT: scaled_dot_product_attention\nCHECK-NOT: softmax\n"
        "CHECK: torch.ops.higher_order.flex_attention(%l_q_, %l_k_, %l_v_\n"
        f"CHECK: %getitem = {{{{.*}}}}: f32[1, 2, {L}, {D}]  # flex_attention output; mask_mod: {text}\n",
        sdpa_note(tmp_path),
    )


def test_auto_keeps_sdpa_on_the_cpu_and_says_why(tmp_path):
    fn = cases.make_sliding_window(16)
    inputs = qkv()
    with torch.no_grad():
        _, out, records = compile_and_collect(fn, inputs, dump_dir=str(tmp_path))
    torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)
    assert kernels_pass(records).matches == 0
    filecheck("CHECK: scaled_dot_product_attention{{.*}}kernel: sdpa (on the CPU flex is not measured faster\n",
              sdpa_note(tmp_path))


def test_training_on_the_cpu_stays_on_sdpa_with_equal_gradients(tmp_path):
    fn = cases.make_documents(8)
    inputs = qkv(requires_grad=True)
    compiled, out, records = compile_and_collect(fn, inputs, attention_kernel="flex", dump_dir=str(tmp_path))
    assert kernels_pass(records).matches == 0
    assert "no flex_attention backward on cpu" in sdpa_note(tmp_path)
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    ref = fn(*ref_in)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip(inputs, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_a_query_row_with_no_key_is_not_given_to_flex(tmp_path):
    inputs = qkv()
    with torch.no_grad():
        _, out, records = compile_and_collect(strictly_causal, inputs, attention_kernel="flex", dump_dir=str(tmp_path))
        ref = strictly_causal(*inputs)
    assert torch.isnan(ref[..., 0, :]).all()  # the eager semantics being kept
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert kernels_pass(records).matches == 0
    assert "has no key to attend to" in sdpa_note(tmp_path)


class TwoLayers(torch.nn.Module):
    def forward(self, q, k, v):
        h = cases.make_sliding_window(16)(q, k, v)
        return cases.make_sliding_window(16)(h, k, v)


def test_layers_with_one_mask_share_one_block_mask():
    inputs = qkv()
    model = TwoLayers()
    with torch.no_grad():
        compiled, out, records = compile_and_collect(model, inputs, attention_kernel="flex")
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert kernels_pass(records).by_rule == {"flex": 2}
    mask = lambda b, h, q, kv: kv <= q  # noqa: E731
    a, _ = flex.block_mask_for(mask, "kv_idx <= q_idx", 32, 32, torch.device("cpu"))
    assert flex.block_mask_for(mask, "kv_idx <= q_idx", 32, 32, torch.device("cpu"))[0] is a


def test_block_mask_buffers_are_registered_once_per_mask():
    seen = {}

    def spy(gm, example_inputs):
        seen["buffers"] = [n for n, _ in gm.named_buffers()]
        return gm.forward

    from kp_compiler.lowering import registry

    original = registry.LOWERINGS["inductor"]
    registry.LOWERINGS["inductor"] = lambda gm, ex, mode, cfg, dump=None: spy(gm, ex)
    try:
        with torch.no_grad():
            inputs = qkv()
            out = torch.compile(TwoLayers(), backend="kernelpytorch", options={"attention_kernel": "flex"})(*inputs)
    finally:
        registry.LOWERINGS["inductor"] = original
    assert out.shape == inputs[0].shape
    assert len(seen["buffers"]) == 8 and all(n.startswith("kp_block_mask_") for n in seen["buffers"])


def test_symbolic_lengths_stay_on_sdpa(tmp_path):
    fn = cases.make_sliding_window(16)
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True,
                             options={"attention_kernel": "flex", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        for n in (32, 48):
            inputs = qkv(L=n)
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    text = "\n".join(p.read_text() for p in tmp_path.glob("graph-*/*attention*.txt"))
    assert "scaled_dot_product_attention" in text and "softmax" not in text  # rewritten, to SDPA
    assert "flex_attention" not in text


def padded_rows(q, k, v):  # a data-dependent mask: rows whose query sums below -100 see no key
    keep = (q.sum(-1, keepdim=True) > -100).expand(-1, -1, -1, q.shape[-2])
    keep = keep & (torch.arange(q.shape[-2]) > 2)[:, None]  # rows 0..2 see nothing
    return cases.naive(q, k, v, mask=keep)


def test_sdpa_keeps_eagers_nan_for_rows_with_no_key():
    """SDPA returns 0 for a fully masked row where eager's softmax gives NaN; the pass keeps NaN."""
    inputs = qkv()
    with torch.no_grad():
        _, out, records = compile_and_collect(padded_rows, inputs)
        ref = padded_rows(*inputs)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.matches == 1
    assert torch.isnan(ref[..., :3, :]).all() and not torch.isnan(ref[..., 3:, :]).any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_mask_shared_by_layers_is_lifted_and_proven_once(monkeypatch):
    """transformers builds one mask node for all layers; the grid proof must not run per layer."""
    from kp_compiler.passes.attention import mask_mod
    from kp_compiler.testing.hf import build

    calls = []
    real = mask_mod._lift_and_prove
    monkeypatch.setattr(mask_mod, "_lift_and_prove", lambda *a: calls.append(a) or real(*a))
    model, vocab = build("mistral", "tiny")  # 2 layers, sliding window 16
    ids = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        _, out, records = compile_and_collect(model, (ids,))
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.by_rule == {"mask-tensor": 2} and len(calls) == 1
