"""The real-model suite: transformers models as users run them, inference and a training step.

Every model is built from a small config with random weights and
transformers' own defaults: no ``attn_implementation`` or
``experts_implementation`` is passed, so Llama, Mistral and GPT-2 run the
``sdpa`` path, Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 their
``grouped_mm`` experts and Gemma2 its eager,
softcapped attention. Sizes (GPU): 4 layers of d=1024 at batch 4 x 1024;
Mistral with a 1024-token sliding window at batch 2 x 4096, Gemma2 also at
2 x 4096 (issue 16's shape); Qwen3-MoE with 64 experts, top-8. Smoke runs
(CPU) use 2 layers of d=64 at 2 x 32 tokens.

Peers (``PEERS``): the same models on transformers' own
``attn_implementation="flex_attention"`` path, run under Inductor only, in
the same process as the rows they are compared with.

Each kernelpytorch row must be at least 0.98x of Inductor, or the README's
table says which issue addresses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kp_compiler.testing import hf

from . import Scale, Workload, case
from .e2e import _lm_workload, _logits

# name -> (transformers model, GPU tokens (batch, seq), what the defaults mean)
MODELS = {
    "gemma2-4096": ("gemma2", (2, 4096), "its default attention (transformers 5.17: sdpa, which drops the softcap; "
                    "5.24: eager, softcapped), 1024-token window on alternate layers"),
    "llama3": ("llama3", (4, 1024), "sdpa attention, GQA 16/4"),
    "mistral-window": ("mistral", (2, 4096), "sdpa attention with a 1024-token sliding window mask"),
    "qwen3-moe": ("qwen3_moe", (4, 1024), "64 experts top-8, grouped_mm experts"),
    "mixtral": ("mixtral", (4, 1024), "8 experts top-2 (d=1024, f=2816), grouped_mm experts"),
    "olmoe": ("olmoe", (4, 1024), "64 experts top-8, softmax routing not renormalised, grouped_mm experts"),
    "deepseek-v3": ("deepseek_v3", (4, 1024), "64 experts top-8, sigmoid routing with a selection bias, "
                    "group-limited (4 groups, top 2), a shared expert, MLA attention; grouped_mm experts"),
    "gemma2": ("gemma2", (4, 1024), "eager softcapped attention, sliding window on alternate layers"),
    "gpt2": ("gpt2", (4, 1024), "sdpa attention"),
}


# variant name -> (the MODELS entry it runs, attn_implementation): an attention path other than the default
VARIANTS = {
    "gemma2-4096-eager": ("gemma2-4096", "eager"),  # the softcapped path, whichever transformers is installed
}

# peer name -> (the MODELS entry it runs, attn_implementation): transformers' own kernels path
PEERS = {
    "mistral-window-hf-flex": ("mistral-window", "flex_attention"),
    "gemma2-4096-hf-flex": ("gemma2-4096", "flex_attention"),
}


# dynamic-length runs: name -> (the MODELS entry, GPU lengths one step runs, attn_implementation or None)
DYNAMIC_LENGTHS = (4096, 3072, 2048)
DYNAMIC = {
    "mistral-window-dynamic": ("mistral-window", None),
    "mistral-window-dynamic-hf-flex": ("mistral-window", "flex_attention"),  # the peer, under Inductor
}
_ALL_DYNAMIC = {"assume_static_by_default": False, "automatic_dynamic_shapes": True}


def _build_dynamic(name: str, scale: Scale, train: bool, attn=None) -> Workload:
    """One step runs the model at three lengths with every dim dynamic from the first call (one compile);
    the loss is cross-entropy against targets made from the positions (the step's cost, not a real task)."""
    model_name, (batch, _), note = MODELS[name]
    model, vocab = hf.build(model_name, "tiny" if scale.smoke else "suite", attn=attn, experts=None)
    model = model.to(scale.device, scale.dtype)
    if not train:
        model.eval()
    lengths = (64, 48, 32) if scale.smoke else DYNAMIC_LENGTHS
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randint(0, vocab, (2 if scale.smoke else batch, T), generator=g).to(scale.device),)
            for T in lengths]

    def loss(out):
        logits = _logits(out).float().flatten(0, 1)
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device) % logits.shape[1])

    wl = Workload(model, sets[0], loss=loss if train else None, output=_logits, dynamo_config=dict(_ALL_DYNAMIC),
                  more_inputs=sets[1:])
    wl.note = (f"one step = lengths {lengths}, every dim dynamic; "
               + (note if attn is None else f"transformers' attn_implementation={attn!r} (the peer)"))
    if attn == "flex_attention":
        wl.reference_dtype = torch.float32
    return wl


# activation-checkpointed training: name -> (the MODELS entry, attn_implementation or None); every decoder
# layer under transformers' own gradient checkpointing (non-reentrant), as Trainer's gradient_checkpointing=True
CHECKPOINTED = {
    "gemma2-4096-eager-ac": ("gemma2-4096", "eager"),
    "llama3-ac": ("llama3", None),
}


def _build(name: str, scale: Scale, train: bool, attn=None, peer: bool = True, ac: bool = False) -> Workload:
    model_name, tokens, note = MODELS[name]
    model, vocab = hf.build(model_name, "tiny" if scale.smoke else "suite", attn=attn, experts=None)
    if ac:  # transformers checkpoints only in training mode (its layers check self.training)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    wl = _lm_workload(model, vocab, scale, train, tokens=None if scale.smoke else tokens)
    wl.note = note if attn is None else f"transformers' attn_implementation={attn!r}" + (" (the peer)" if peer else "")
    if ac:
        wl.note += "; every layer activation-checkpointed (gradient_checkpointing_enable, non-reentrant)"
    if model_name in ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3") or attn == "flex_attention":
        wl.reference_dtype = torch.float32  # torch._grouped_mm and flex_attention have no float64 kernels
    return wl


for _name in MODELS:
    for _train in (False, True):
        case(f"model-{_name}-{'train' if _train else 'infer'}", "models", train=_train, requires=("transformers",))(
            lambda scale, n=_name, train=_train: _build(n, scale, train))
for _name, (_model, _attn) in VARIANTS.items():
    for _train in (False, True):
        case(f"model-{_name}-{'train' if _train else 'infer'}", "models", train=_train, requires=("transformers",))(
            lambda scale, n=_model, a=_attn, train=_train: _build(n, scale, train, a, peer=False))
for _name, (_model, _attn) in CHECKPOINTED.items():
    case(f"model-{_name}-train", "models", train=True, requires=("transformers",))(
        lambda scale, n=_model, a=_attn: _build(n, scale, True, a, peer=False, ac=True))
for _name, (_model, _attn) in PEERS.items():
    for _train in (False, True):
        case(f"model-{_name}-{'train' if _train else 'infer'}", "models", train=_train, requires=("transformers",),
             backends=("inductor",))(lambda scale, n=_model, a=_attn, train=_train: _build(n, scale, train, a))
for _name, (_model, _attn) in DYNAMIC.items():
    for _train in (False, True):
        case(f"model-{_name}-{'train' if _train else 'infer'}", "models", train=_train, requires=("transformers",),
             backends=("inductor",) if _attn else ())(
            lambda scale, n=_model, a=_attn, train=_train: _build_dynamic(n, scale, train, a))
