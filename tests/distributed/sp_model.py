"""A Llama-style model with torchtitan's module names and its tensor + sequence parallel plan, for the gloo
tests: between the blocks' linears the activations are split over tokens (``Shard(1)``), the norms run on
those shards (``SequenceParallel``), attention and MLP gather them (``PrepareModuleInput``) and their output
projections reduce-scatter back (``RowwiseParallel(output_layouts=Shard(1))``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool = False):
        super().__init__()
        self.hd = d // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.hd).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
        return self.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, d: int, f: int, bias: bool = False):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.w2 = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, f: int, bias: bool = False):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attention, self.feed_forward = Attention(d, heads, bias), FeedForward(d, f, bias)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """``bias=True`` gives the blocks' linears biases (torchtitan's have none): the row-parallel ones are then
    added to token shards, and their gradients must be summed over the group."""

    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, f: int = 128, layers: int = 2,
                 bias: bool = False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, f, bias) for _ in range(layers))
        self.norm, self.output = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def parallelize(model: Llama, mesh) -> Llama:
    """torchtitan's Llama plan (without loss parallelism: the logits are gathered whole)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    gathered = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "attention_norm": SequenceParallel(), "attention": gathered,
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(), "feed_forward": gathered,
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    return model
