"""Causal sliding windows on torch's flash kernel (``flash_window.py``), where the device table says so.

The flash kernel has no CPU implementation, so these tests register one for
the two ATen ops (``reference_flash``): a plain softmax over the keys the
flash kernel keeps for ``window_size_left`` / ``window_size_right``, as its
documentation states them. They check what the rewrite emits and that the
rewritten graph computes eager's values and gradients under that reading;
``scripts/gpu_flash_window_check.py`` checks the real kernel on the GPU.
"""

import contextlib

import pytest
import torch

from kp_compiler.core.devices import DeviceInfo, simulate
from kp_compiler.passes.attention.flash_window import window_of
from kp_compiler.passes.attention.kernel_table import AttentionCase, choose
from kp_compiler.passes.attention.value_masks import causal, chunked, sliding_window
from kp_compiler.testing.compare import assert_same_grads
from tests.utils import compile_and_collect, filecheck, input_grads

tf_masks = pytest.importorskip("transformers.masking_utils")

HOPPER = DeviceInfo("cuda", (9, 0), "H200")
B, H, KV, L, D = 2, 4, 2, 32, 16


def test_window_of_proves_only_an_exact_causal_window():
    assert window_of(sliding_window(8), 32, 32) == 8
    assert window_of(sliding_window(1), 32, 32) == 1
    assert window_of(causal, 32, 32) is None  # SDPA's is_causal serves it
    assert window_of(chunked(8), 32, 32) is None
    assert window_of(lambda b, h, q, kv: (kv <= q) & (q - kv < 8) & (kv != 3), 32, 32) is None  # a hole
    assert window_of(lambda b, h, q, kv: (q - kv < 8) & (kv - q < 8), 32, 32) is None  # not causal
    assert window_of(sliding_window(8), 16, 32) is None  # unequal lengths: the kernel aligns causal bottom-right


def case(**kw):
    base = dict(device=HOPPER, dtype=torch.bfloat16, head_dim=64, mask="mask_mod", train=True, window=1024)
    return AttentionCase(**{**base, **kw})


def test_kernel_table_row():
    assert choose(case()).kernel == "flash-window"
    assert choose(case(), prefer="flex").kernel == "flex"  # attention_kernel="flex" still forces flex
    assert choose(case(), prefer="sdpa").kernel == "sdpa"
    for kw, why in (({"window": None}, "flex"), ({"score_mod": True}, "flex"), ({"dtype": torch.float32}, "flex"),
                    ({"head_dim": 12}, "sdpa"), ({"dropout": True}, "sdpa"),
                    ({"device": DeviceInfo("cuda", (8, 0))}, "flex"),  # not measured there: flex, as before
                    ({"device": DeviceInfo("cuda", (10, 0))}, "flex")):
        assert choose(case(**kw)).kernel == why, kw


def _flash_reference(q, k, v, lq, lk, is_causal, scale, left, right):
    """What the flash kernel computes, in float32: q [B, L, H, D], k and v [B, S, Hk, D] (GQA by head groups).

    Returns the output [B, H, L, D], the masked scores, and q and the head-repeated k, v (for the backward)."""
    groups = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = (t.repeat_interleave(groups, dim=1) for t in (kf, vf))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = qf @ kf.transpose(-2, -1) * scale
    i = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right alignment
    j = torch.arange(lk)[None, :]
    right = 0 if is_causal else right
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if left is not None and left >= 0:
        keep &= j >= i - left
    if right is not None and right >= 0:
        keep &= j <= i + right
    scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ vf, scores, qf, kf, vf, scale


@contextlib.contextmanager
def reference_flash():
    """CPU implementations of ``aten._flash_attention_forward`` / ``_backward`` (the reading above)."""
    lib = torch.library.Library("aten", "IMPL")

    def forward(q, k, v, cq, ck, lq, lk, p, is_causal, debug, *, scale=None, window_size_left=None,
                window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
        out, scores, *_ = _flash_reference(q, k, v, lq, lk, is_causal, scale, window_size_left, window_size_right)
        lse = scores.logsumexp(-1)
        seed, offset = torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)
        return out.transpose(1, 2).to(q.dtype), lse, seed, offset, torch.empty(0, dtype=q.dtype)

    def backward(grad, q, k, v, out, lse, cq, ck, lq, lk, p, is_causal, rng, unused, *, scale=None,
                 window_size_left=None, window_size_right=None):
        out_f, scores, qf, kf, vf, sc = _flash_reference(q, k, v, lq, lk, is_causal, scale, window_size_left,
                                                         window_size_right)
        probs = scores.softmax(-1)
        go = grad.float().transpose(1, 2)  # softmax attention's gradients, by hand (autograd is off in a kernel)
        gv = probs.transpose(-2, -1) @ go
        gp = go @ vf.transpose(-2, -1)
        gs = probs * (gp - (go * out_f).sum(-1, keepdim=True))
        gq, gk = gs @ kf * sc, gs.transpose(-2, -1) @ qf * sc
        groups = q.shape[2] // k.shape[2]
        gk, gv = (t.unflatten(1, (k.shape[2], groups)).sum(2) for t in (gk, gv))
        return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((gq, q), (gk, k), (gv, v)))

    lib.impl("_flash_attention_forward", forward, "CPU")
    lib.impl("_flash_attention_backward", backward, "CPU")
    try:
        yield
    finally:
        lib._destroy()


class WindowSdpa(torch.nn.Module):
    """transformers' sdpa path with a sliding window: ``sdpa_mask``, repeat_kv, SDPA."""

    def forward(self, q, k, v):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  mask_function=tf_masks.sliding_window_causal_mask_function(8),
                                  allow_is_causal_skip=False, device=q.device)
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, v.shape[2], v.shape[3])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)


def qkv():
    return [torch.randn(s, dtype=torch.bfloat16) for s in [(B, H, L, D), (B, KV, L, D), (B, KV, L, D)]]


def test_window_goes_to_flash_with_gqa_and_matches_eager(tmp_path):
    fn = WindowSdpa()
    with reference_flash(), simulate(HOPPER):
        compiled, _, records = compile_and_collect(fn, [t.requires_grad_() for t in qkv()], dump_dir=str(tmp_path))
        (rec,) = [p for r in records for p in r.passes if p.name == "attention-kernels"]
        assert rec.by_rule == {"flash-window": 1}
        for _ in range(2):  # fresh inputs: values and gradients against eager SDPA with the dense mask
            inputs = qkv()
            out, got = input_grads(compiled, inputs)
            ref, want = input_grads(fn, inputs)
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
            assert_same_grads(got, want, rtol=2e-2, atol=2e-2)
    text = (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text()
    filecheck("CHECK-NOT: scaled_dot_product_attention\n"
              "CHECK-NOT: expand\n"
              "CHECK: aten._flash_attention_forward.default({{.*}}, None, None, 32, 32, 0.0, True, False, "
              "scale=0.25, window_size_left=7, window_size_right=0)\n", text)


def test_off_hopper_the_window_stays_on_flex():
    """The flash row is measured on the H200 only: elsewhere the window goes to flex as before."""
    fn = WindowSdpa()
    with torch.no_grad(), simulate(DeviceInfo("cuda", (8, 0))):
        compiled, _, records = compile_and_collect(fn, qkv())
        (rec,) = [p for r in records for p in r.passes if p.name == "attention-kernels"]
        assert rec.by_rule == {"flex": 1}
        inputs = qkv()
        torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=2e-2, atol=2e-2)
