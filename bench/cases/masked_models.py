"""transformers models fed the masks users feed them: a left-padded batch, packed documents.

Llama-3-style (the suite's 4 layers of d=1024, GQA 16/4), batch 4 x 1024 on
the GPU. ``padded``: ``attention_mask`` zero on 0, 128, 256 and 384 leading
tokens of the four rows (batched generation's prompt padding). ``packed``:
position ids restarting at document starts (documents of 300, 200 and 524
tokens) and no cache, so transformers derives document ids from them (a
training step on packed data). Each has transformers' own
``flex_attention`` path under Inductor as the peer row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kp_compiler.testing import hf

from . import Scale, Workload, case
from .e2e import _logits, _tokens


class _Packed(torch.nn.Module):
    """``model(input_ids, position_ids=..., use_cache=False)`` as a two-input module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, positions):
        return self.model(input_ids=ids, position_ids=positions, use_cache=False)


def _build(kind: str, scale: Scale, train: bool, attn: str = "sdpa") -> Workload:
    torch.manual_seed(0)
    model, vocab = hf.build("llama3", "tiny" if scale.smoke else "suite", attn=attn, experts=None)
    model = model.to(scale.device, scale.dtype)
    if not train:
        model.eval()
    ids = _tokens(scale, vocab, (4, 1024))
    B, T = ids.shape
    if kind == "padded":
        lead = torch.arange(B) * (T // 8)
        extra = (torch.arange(T)[None, :] >= lead[:, None]).long().to(scale.device)
    else:
        docs = (12, 8, 12) if scale.smoke else (300, 200, 524)
        extra = torch.cat([torch.arange(n) for n in docs])[None].expand(B, T).contiguous().to(scale.device)
        model = _Packed(model)

    def loss(out):
        return F.cross_entropy(_logits(out).float().flatten(0, 1), ids.flatten())

    note = ("left padding 0/128/256/384 tokens" if kind == "padded" else "packed documents 300/200/524, no cache")
    wl = Workload(model, (ids, extra), loss=loss if train else None, output=_logits,
                  note=note + ("" if attn == "sdpa" else f"; transformers' attn_implementation={attn!r} (the peer)"))
    if attn == "flex_attention":
        wl.reference_dtype = torch.float32  # flex_attention has no float64 kernel
    return wl


for _kind in ("padded", "packed"):
    for _train in (False, True):
        _suffix = "train" if _train else "infer"
        case(f"model-llama3-{_kind}-{_suffix}", "models", train=_train, requires=("transformers",))(
            lambda scale, k=_kind, train=_train: _build(k, scale, train))
        case(f"model-llama3-{_kind}-hf-flex-{_suffix}", "models", train=_train, requires=("transformers",),
             backends=("inductor",))(lambda scale, k=_kind, train=_train: _build(k, scale, train, "flex_attention"))
