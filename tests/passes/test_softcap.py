"""Softcapped attention (Gemma2's eager path) taken to FlexAttention with a ``score_mod``."""

import math

import pytest
import torch

from kp_compiler.passes.attention import softcap
from kp_compiler.passes.attention.kernel_table import Choice
from kp_compiler.testing import hf
from kp_compiler.testing.compare import assert_same_grads
from tests.utils import compile_and_collect, filecheck, input_grads, loss_and_grads

B, H, L, D = 2, 4, 32, 16


def kernels(records):
    (rec,) = [p for r in records for p in r.passes if p.name == "attention-kernels"]
    return rec


def capped(cap=30.0, inner=None, window=None):
    """Gemma2's eager attention, written out: scale, tanh cap, then the 0 / finfo.min mask."""
    def fn(q, k, v):
        i = torch.arange(q.shape[2])
        keep = i[None, :] <= i[:, None]
        if window is not None:
            keep = keep & (i[:, None] - i[None, :] < window)
        mask = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        s = (q @ k.transpose(-2, -1)) * D**-0.5
        s = torch.tanh(s / cap if inner is None else s * inner) * cap
        p = torch.softmax((s + mask).float(), dim=-1).to(q.dtype)
        return p @ v
    return fn


def qkv(requires_grad=False):
    return [(torch.randn(B, H, L, D) * 3).requires_grad_(requires_grad) for _ in range(3)]  # * 3: the cap bites


@pytest.mark.parametrize("spelling", ["div", "mul-reciprocal"])
def test_softcap_runs_on_flex_with_its_score_mod(spelling, tmp_path):
    fn = capped(inner=None if spelling == "div" else 1 / 30.0, window=8)
    with torch.no_grad():
        compiled, out, records = compile_and_collect(fn, qkv(), attention_kernel="flex", strict=True,
                                                     dump_dir=str(tmp_path))
        assert kernels(records).by_rule == {"flex-softcap": 1}
        for _ in range(2):
            inputs = qkv()
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    filecheck("CHECK-NOT: aten.softmax\nCHECK-NOT: aten.tanh\n"
              "CHECK: flex_attention output; mask_mod: (kv_idx <= q_idx) & (q_idx - kv_idx < 8); "
              "score_mod: tanh(score / 30) * 30\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


def test_softcap_on_the_cpu_by_default_stays_eager_and_says_why():
    fn = capped()
    inputs = qkv()
    with torch.no_grad():
        _, out, records = compile_and_collect(fn, inputs)
    rec = kernels(records)
    assert rec.matches == 0
    assert any("left as it is: on the CPU flex is not measured faster" in n for n in rec.notes), rec.notes
    torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [
    capped(cap=30.0, inner=1 / 50.0),  # tanh(s / 50) * 30 is not a softcap
    lambda q, k, v: torch.softmax(torch.tanh((q @ k.transpose(-2, -1)) / 30.0 + 1.0) * 30.0, -1) @ v,
], ids=["caps-differ", "shifted-inside-tanh"])
def test_other_tanh_transforms_are_left_alone(fn):
    inputs = qkv()
    with torch.no_grad():
        _, out, records = compile_and_collect(fn, inputs, attention_kernel="flex")
    assert kernels(records).matches == 0
    (rec,) = [p for r in records for p in r.passes if p.name == "attention-to-sdpa"]
    assert rec.matches == 0
    torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)


def test_softcap_gradients_equal_eager(monkeypatch):
    """The rewritten graph, run by the eager lowering (flex_attention's own autograd on the CPU):
    outputs and gradients of q, k, v equal eager. The table would keep training on the CPU eager,
    so it is told to pick flex here; the GPU runs the same graph through Inductor."""
    monkeypatch.setattr(softcap, "choose", lambda case, prefer, flex_options="auto": Choice("flex", "test"))
    fn = capped(window=8)
    inputs = qkv(requires_grad=True)
    compiled, out, records = compile_and_collect(fn, inputs, lowering="eager")
    assert kernels(records).by_rule == {"flex-softcap": 1}
    out, got = input_grads(compiled, inputs)
    ref, want = input_grads(fn, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # fp32; flex's backward sums in another order: absolute tolerance 1e-5 of the largest gradient
    assert_same_grads(got, want, rtol=1e-3, atol=1e-5 * max(float(g.abs().max()) for g in want.values()))


def test_transformers_gemma2_eager_attention_on_flex(tmp_path):
    # eager: softcapped, window on alternate layers (transformers 5.24's default; 5.17 defaults to sdpa,
    # which drops the softcap, and is covered by test_given_sdpa.py's lifts)
    model, vocab = hf.build("gemma2", "tiny", attn="eager")
    ids = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        compiled, out, records = compile_and_collect(model, [ids], attention_kernel="flex", dump_dir=str(tmp_path))
        assert kernels(records).by_rule == {"flex-softcap": 2}
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        ids = torch.randint(0, vocab, (2, 32))
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    cap = model.config.attn_logit_softcapping
    filecheck(f"CHECK: mask_mod: (kv_idx > q_idx - 16) & (kv_idx <= q_idx); score_mod: tanh(score / {cap:g}) * {cap:g}\n"
              f"CHECK: mask_mod: kv_idx <= q_idx; score_mod: tanh(score / {cap:g}) * {cap:g}\n",
              (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text())


def test_transformers_gemma2_training_step_gradients(monkeypatch):
    monkeypatch.setattr(softcap, "choose", lambda case, prefer, flex_options="auto": Choice("flex", "test"))
    model, vocab = hf.build("gemma2", "tiny", attn="eager")
    model.train()
    ids = torch.randint(0, vocab, (2, 32))
    compiled, out, records = compile_and_collect(lambda i: model(i, labels=i, use_cache=False), [ids],
                                                 lowering="eager")
    assert kernels(records).by_rule == {"flex-softcap": 2}
    loss, got = loss_and_grads(model, lambda i: compiled(i).loss, ids)
    ref, want = loss_and_grads(model, lambda i: model(i, labels=i, use_cache=False).loss, ids)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, want, rtol=1e-4, atol=1e-5)
