"""transformers' ``LlamaForCausalLM`` under transformers' own tensor parallelism, for ``bench.distributed``'s
``tp-hf`` configuration: the styles and the model's ``tp_plan`` that ``from_pretrained(tp_plan="auto")``
applies (``apply_tensor_parallelism``), at the bench's widths, returning the same next-token loss as
``bench.distributed.LlamaStyle``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class NextTokenLoss(nn.Module):
    """``model(input_ids=ids).logits`` and the shifted cross-entropy (in fp32, as ``LlamaStyle``'s)."""

    def __init__(self, model: nn.Module, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, ids):
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, self.vocab), ids[:, 1:].reshape(-1))


def llama_tp(shape: dict, mesh, device, dtype) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape``'s widths (sdpa attention, as many KV heads as heads), on ``device`` in
    ``dtype``, parallelized over ``mesh`` by transformers' own tensor parallelism (q, k, v, gate, up and the LM
    head colwise, o and down rowwise, the embedding rowwise)."""
    import transformers
    from transformers.integrations.tensor_parallel import apply_tensor_parallelism

    config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"],
                                      intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                                      max_position_embeddings=shape["seq"], attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model.tp_plan))
    return NextTokenLoss(model, shape["vocab"])
