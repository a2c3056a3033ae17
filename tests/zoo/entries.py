"""The model zoo: real models (nobody wrote them for us) built small, random weights.

Each entry builds ``(model, input_ids)`` for a device and dtype, plus the
Dynamo settings it needs. ``FAST`` marks the subset CI runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kp_compiler.testing import hf
from kp_compiler.testing.models import TinyGPT, TinyMoEGPT


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], torch.nn.Module]
    vocab: int
    requires: tuple = ()
    dynamo_config: dict = field(default_factory=dict)
    fast: bool = True


def _hf(name: str, attn: str = "eager", experts: str | None = None):
    return lambda: hf.build(name, "tiny", attn=attn, experts=experts)[0]


ENTRIES = [
    Entry("gpt-handwritten", lambda: TinyGPT(vocab=256, d=64, heads=4, layers=2, max_len=64), 256),
    Entry("moe-loop-handwritten", lambda: TinyMoEGPT(vocab=256, d=64, heads=4, layers=2, max_len=64),
          256, dynamo_config={"capture_dynamic_output_shape_ops": True}),
    Entry("hf-llama-eager", _hf("llama"), 256, ("transformers",)),
    Entry("hf-llama-sdpa", _hf("llama", "sdpa"), 256, ("transformers",)),
    Entry("hf-mistral-sliding-window", _hf("mistral"), 256, ("transformers",)),
    Entry("hf-gpt2", _hf("gpt2"), 256, ("transformers",)),
    Entry("hf-bert", _hf("bert"), 256, ("transformers",)),
    # Custom autograd.Functions in the model code (their gradients were once lost: issue 14)
    Entry("hf-recurrent-gemma", _hf("recurrent_gemma"), 256, ("transformers",)),
    Entry("hf-bloom-train-mode", lambda: _hf("bloom")().train(), 256, ("transformers",)),
] + [
    Entry(f"hf-{model}-{impl}", _hf(model, experts=impl), 256, ("transformers",))
    for model in ("mixtral", "qwen2_moe") for impl in hf.EXPERTS_ONE_GRAPH
]

BY_NAME = {e.name: e for e in ENTRIES}
