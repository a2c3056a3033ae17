"""End-to-end cases: whole models, inference and a training step.

A training step is forward, cross-entropy loss, backward and an AdamW step
(the harness owns the optimizer). The GPU size follows the anchors (batch
4 x 1024 tokens, 8 layers of d=1024 for the dense models, 4 MoE layers of 16
experts); smoke runs use 2 layers of d=64 and 2 x 32 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kp_compiler.testing import hf
from kp_compiler.testing.models import TinyGPT, TinyMoEGPT

from . import Scale, Workload, case


def _tokens(scale: Scale, vocab: int, shape=None):
    batch, seq = (2, 32) if scale.smoke else (shape or (4, 1024))
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(scale.device)


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _lm_workload(model, vocab: int, scale: Scale, train: bool, tokens=None, **extra) -> Workload:
    """``tokens``: (batch, seq) on the GPU, default 4 x 1024; smoke runs always take 2 x 32."""
    model = model.to(scale.device, scale.dtype)
    ids = _tokens(scale, vocab, tokens)

    def loss(out):
        return F.cross_entropy(_logits(out).float().flatten(0, 1), ids.flatten())

    if not train:
        model.eval()
    return Workload(model, (ids,), loss=loss if train else None, output=_logits, **extra)


def _gpt(scale: Scale, train: bool) -> Workload:
    torch.manual_seed(0)
    if scale.smoke:
        model = TinyGPT(vocab=256, d=64, heads=4, layers=2, max_len=64)
    else:
        model = TinyGPT(vocab=32000, d=1024, heads=16, layers=8, max_len=1024)
    return _lm_workload(model, model.head.out_features, scale, train)


def _moe_gpt(scale: Scale, train: bool) -> Workload:
    torch.manual_seed(0)
    if scale.smoke:
        model = TinyMoEGPT(vocab=256, d=64, heads=4, layers=2, max_len=64, f=64, experts=4, top_k=2)
    else:
        model = TinyMoEGPT(vocab=32000, d=1024, heads=16, layers=4, max_len=1024, f=2816, experts=16, top_k=2)
    return _lm_workload(model, model.head.out_features, scale, train,
                        dynamo_config={"capture_dynamic_output_shape_ops": True})


def _hf(name: str, attn: str = "eager", experts=None):
    def build(scale: Scale, train: bool) -> Workload:
        model, vocab = hf.build(name, "tiny" if scale.smoke else "bench", attn=attn, experts=experts)
        wl = _lm_workload(model, vocab, scale, train)
        if experts == "grouped_mm":
            wl.reference_dtype = torch.float32  # torch._grouped_mm has no float64 kernel
        return wl
    return build


BUILDERS = {
    "gpt": (_gpt, ()),
    "moe-loop-gpt": (_moe_gpt, ()),
    "hf-llama": (_hf("llama"), ("transformers",)),
    "hf-mistral": (_hf("mistral"), ("transformers",)),
    "hf-gpt2": (_hf("gpt2"), ("transformers",)),
    "hf-bert": (_hf("bert"), ("transformers",)),
    # transformers' own grouped_mm experts path: what the fused routed-experts op has to beat
    "hf-mixtral-grouped-mm": (_hf("mixtral", experts="grouped_mm"), ("transformers",)),
}

for _name, (_build, _requires) in BUILDERS.items():
    for _train in (False, True):
        case(f"{_name}-{'train' if _train else 'infer'}", "e2e", train=_train, requires=_requires)(
            lambda scale, b=_build, train=_train: b(scale, train))

