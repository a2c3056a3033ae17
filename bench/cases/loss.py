"""Issue 20: training steps whose LM head has a 128k vocabulary (Llama 3's), where the logits dominate memory.

- ``lce-128k-train``: a Llama-style model, 2 layers, d=1024 (16 heads, 8 KV heads, ffn 3584), vocabulary
  128256, batch 4 x 1024, ``sdpa``, bf16, a step of fused AdamW;
- ``lce-128k-large-train``: the same with 8 layers at batch 8 x 2048.

The step is what a user compiles to train without keeping the logits: a function of the ids and labels that
returns transformers' own loss (``ForCausalLMLoss``: labels shifted, logits upcast); the model returning its
logits too would keep them whatever the compiler does. kernelpytorch rows set ``options["linear_cross_entropy"]=True``,
so that the pass (a default on CUDA 9.0 and up) also runs in the CPU smoke run. The ``liger`` row (``bench/backends.py``) computes the same loss with
Liger-Kernel's fused linear cross-entropy on the model's hidden states, under Inductor. Smoke: d=32, vocabulary
512, batch 2 x 16, fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Scale, Workload, case

SHAPES = {"lce-128k-train": dict(layers=2, batch=(4, 1024)), "lce-128k-large-train": dict(layers=8, batch=(8, 2048))}


class LossOnly(nn.Module):
    """``model(input_ids=ids, labels=labels).loss``; with ``liger_loss`` set, that loss through Liger's op."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.liger_loss = None

    def forward(self, ids, labels):
        if self.liger_loss is None:
            return self.model(input_ids=ids, labels=labels).loss
        hidden = self.model.model(input_ids=ids).last_hidden_state
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return self.liger_loss(self.model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), shifted.reshape(-1))


def _build(shape: dict, scale: Scale) -> Workload:
    import transformers as tf

    d, vocab, layers, (b, t) = ((32, 512, 2, (2, 16)) if scale.smoke else (1024, 128256, shape["layers"],
                                                                          shape["batch"]))
    cfg = tf.LlamaConfig(hidden_size=d, intermediate_size=d * 7 // 2, num_hidden_layers=layers,
                         num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 128),
                         vocab_size=vocab, max_position_embeddings=max(t, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(scale.device, scale.dtype)
    ids = torch.randint(0, vocab, (b, t), device=scale.device)
    return Workload(LossOnly(model), (ids, ids.clone()), loss=lambda out: out,
                    kp_options={"linear_cross_entropy": True},
                    note=f"{layers} layers, d={d}, vocabulary {vocab}, batch {b} x {t}; the step returns only the loss")


for _name, _shape in SHAPES.items():
    case(_name, "loss", train=True, requires=("transformers",))(lambda scale, s=_shape: _build(s, scale))
