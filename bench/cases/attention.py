"""Attention micro cases: the naive spelling with masks built by index arithmetic.

Anchor shape B=4 H=16 S=4096 D=128 bf16; smoke B=1 H=2 S=64 D=16. Useful
FLOPs count only allowed (query, key) pairs: 4*B*H*D*pairs forward, 3.5x
that for forward+backward.
"""

from __future__ import annotations

import math

import torch

from . import Scale, Workload, case

WINDOW, DOC_LEN = 1024, 512


def _shape(scale: Scale):
    return (1, 2, 64, 16) if scale.smoke else (4, 16, 4096, 128)


def _window(scale: Scale) -> int:
    return 16 if scale.smoke else WINDOW


def _doc_len(scale: Scale) -> int:
    return 8 if scale.smoke else DOC_LEN


def naive(q, k, v, mask=None, bias=None):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _positions(q):
    i = torch.arange(q.shape[-2], device=q.device)
    return i[:, None], i[None, :]


def plain(q, k, v):
    return naive(q, k, v)


def causal(q, k, v):
    i, j = _positions(q)
    return naive(q, k, v, mask=j <= i)


def make_sliding_window(window: int):
    def sliding_window(q, k, v):
        i, j = _positions(q)
        return naive(q, k, v, mask=(j <= i) & (i - j < window))
    return sliding_window


def make_documents(doc_len: int):
    def documents(q, k, v):
        doc = torch.arange(q.shape[-2], device=q.device) // doc_len
        return naive(q, k, v, mask=doc[:, None] == doc[None, :])
    return documents


def alibi(q, k, v):
    heads = q.shape[1]
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, device=q.device) / heads)
    i, j = _positions(q)
    bias = -slopes[:, None, None] * (i - j).clamp(min=0)
    return naive(q, k, v, mask=j <= i, bias=bias.to(q.dtype))


def gqa_causal(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return causal(q, k, v)


def _pairs(kind: str, S: int, window: int, doc_len: int) -> float:
    if kind == "plain":
        return S * S
    if kind == "window":
        return sum(min(i + 1, window) for i in range(S))
    if kind == "docs":
        return (S // doc_len) * doc_len * doc_len
    return S * (S + 1) / 2


def _workload(scale: Scale, fn, kind: str, train: bool, kv_heads=None) -> Workload:
    B, H, S, D = _shape(scale)
    kv = kv_heads or H
    g = torch.Generator(device=scale.device).manual_seed(0)

    def rand(h):
        t = torch.randn(B, h, S, D, device=scale.device, dtype=scale.dtype, generator=g)
        return t.requires_grad_(train)

    flops = 4 * B * H * D * _pairs(kind, S, _window(scale), _doc_len(scale)) * (3.5 if train else 1)
    return Workload(fn, (rand(H), rand(kv), rand(kv)), flops=flops,
                    loss=(lambda out: out.float().square().mean()) if train else None)


def _register(name, fn_for_scale, kind, kv_ratio=1):
    for train in (False, True):
        suffix = "-fwd-bwd" if train else ""

        def build(scale, train=train):
            B, H, S, D = _shape(scale)
            kv = H // (4 if kv_ratio > 1 else 1)
            return _workload(scale, fn_for_scale(scale), kind, train, kv_heads=kv)

        case(f"attention-{name}{suffix}", "attention", train=train)(build)


_register("plain", lambda s: plain, "plain")
_register("causal", lambda s: causal, "causal")
_register("sliding-window", lambda s: make_sliding_window(_window(s)), "window")
_register("documents", lambda s: make_documents(_doc_len(s)), "docs")
_register("alibi", lambda s: alibi, "causal")
_register("gqa-causal", lambda s: gqa_causal, "causal", kv_ratio=4)


# Hand-written references on the same shapes: what the rewrite should reach.
def sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _flex_reference(mask_mod_for):
    """A case function calling flex_attention with a block mask built once, as a user would."""
    def for_scale(scale: Scale):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, H, S, D = _shape(scale)
        block_mask = create_block_mask(mask_mod_for(scale), None, None, S, S, device=scale.device)

        def flex(q, k, v):
            return flex_attention(q, k, v, block_mask=block_mask)
        return flex
    return for_scale


def _window_mod(scale: Scale):
    w = _window(scale)
    return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < w)


def _documents_mod(scale: Scale):
    n = _doc_len(scale)
    return lambda b, h, q_idx, kv_idx: q_idx // n == kv_idx // n


_register("ref-sdpa-causal", lambda s: sdpa_causal, "causal")
_register("ref-flex-sliding-window", _flex_reference(_window_mod), "window")
_register("ref-flex-documents", _flex_reference(_documents_mod), "docs")


# Dynamic lengths: one step runs the naive code at three sequence lengths, compiled with every dim
# dynamic from the first call (Dynamo's assume_static_by_default off): one compile should serve them all.
DYNAMIC_LENGTHS = (4096, 3072, 2048)
_ALL_DYNAMIC = {"assume_static_by_default": False, "automatic_dynamic_shapes": True}


def _register_dynamic(name, fn_for_scale, kind):
    for train in (False, True):
        suffix = "-fwd-bwd" if train else ""

        def build(scale, train=train):
            B, H, _, D = _shape(scale)
            lengths = (64, 48, 32) if scale.smoke else DYNAMIC_LENGTHS
            g = torch.Generator(device=scale.device).manual_seed(0)
            sets = [tuple(torch.randn(B, H, S, D, device=scale.device, dtype=scale.dtype, generator=g)
                          .requires_grad_(train) for _ in range(3)) for S in lengths]
            flops = sum(4 * B * H * D * _pairs(kind, S, _window(scale), _doc_len(scale)) for S in lengths)
            return Workload(fn_for_scale(scale), sets[0], flops=flops * (3.5 if train else 1),
                            loss=(lambda out: out.float().square().mean()) if train else None,
                            dynamo_config=dict(_ALL_DYNAMIC), more_inputs=sets[1:],
                            note=f"one step = lengths {lengths}, every dim dynamic")

        case(f"attention-{name}-dynamic{suffix}", "attention", train=train)(build)


class SlidingWindow(torch.nn.Module):
    """The naive sliding window with the window a module attribute, as models carry it (from their config).

    In ``make_sliding_window`` the window is a closure int, which Dynamo with every dim dynamic turns into a
    symbolic graph input: that mask is not lifted to flex (the block mask would depend on a symbolic int)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        i, j = _positions(q)
        return naive(q, k, v, mask=(j <= i) & (i - j < self.window))


_register_dynamic("causal", lambda s: causal, "causal")
_register_dynamic("sliding-window", lambda s: make_sliding_window(_window(s)), "window")
_register_dynamic("sliding-window-attr", lambda s: SlidingWindow(_window(s)), "window")
