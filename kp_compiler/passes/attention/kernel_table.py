"""The attention kernel table: which kernel one attention site gets, as data.

| mask                       | kernel                                   |
|----------------------------|------------------------------------------|
| none, or causal            | SDPA (``is_causal``): torch picks flash / cuDNN / memory-efficient |
| data-dependent tensor      | SDPA with the mask tensor                |
| index arithmetic (``mask_mod``), or a softcap | FlexAttention with a cached block mask when all hold: Inductor lowering, static lengths, no dropout, fp16/bf16/fp32, head dim a power of two in 16..256, flex on the device (CUDA 8.0+, ROCm; the CPU for inference, only when ``attention_kernel="flex"``); else SDPA with the mask tensor (a softcapped site keeps its eager math) |

FA3 (``flash_attn_interface``) is not emitted: SDPA's flash kernel serves
the unmasked and causal cases (see ``docs/passes/attention.md``). Torch's
flash kernel with a window argument was measured slower than flex for
sliding windows on the H200 and is not a row.

``FLEX_TUNING`` holds flex ``kernel_options`` measured faster than flex's own
heuristics for one device, head dim and pass; the ``flex_kernel_options``
option replaces it (``{}``: flex's heuristics everywhere).

Before (one site as the table sees it)::

    AttentionCase(device=cuda 9.0, dtype=bf16, head_dim=128, mask="mask_mod", train=True)

After::

    Choice(kernel="flex", why="structured mask: FlexAttention skips fully masked blocks")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...core import devices as capabilities
from ...core.devices import DeviceInfo

KERNEL_CHOICES = ("auto", "sdpa", "flex")
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionCase:
    """One attention site as the table sees it."""

    device: DeviceInfo
    dtype: torch.dtype
    head_dim: int
    mask: str  # "none" | "causal" | "tensor" | "mask_mod"
    train: bool = False
    dropout: bool = False
    static_shapes: bool = True
    lowering: str = "inductor"
    score_mod: bool = False  # a bias or softcap rides on the scores


@dataclass(frozen=True)
class Choice:
    kernel: str  # "sdpa" | "flex"
    why: str
    kernel_options: Optional[dict] = None  # flex_attention(kernel_options=...), for "flex"


# (label, matches(case), kernel_options): flex options measured faster than flex's own heuristics.
# H200, torch 2.11, bf16 causal window 1024, B=2 H=16/4 S=4096 D=64 (the suite's Mistral layer), fwd+bwd:
# 1.201 ms with these against 1.438 ms with flex's heuristics (bench/results/2026-12-01-h200-attention-backward-kernels.txt).
FLEX_TUNING: list = [
    ("Hopper, head dim 64, training, 16-bit, no score_mod",
     lambda c: c.device.kind == "cuda" and c.device.capability == (9, 0) and c.head_dim == 64 and c.train
     and c.dtype in (torch.float16, torch.bfloat16) and not c.score_mod,
     {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
      "bwd_num_warps": 8, "bwd_num_stages": 2}),
]


def flex_kernel_options(case: AttentionCase, given="auto") -> Optional[dict]:
    """The ``kernel_options`` flex gets at ``case``: ``given`` when it is a dict, else the first matching
    ``FLEX_TUNING`` row (None: flex's own heuristics)."""
    if isinstance(given, dict):
        return dict(given) or None
    return next((dict(opts) for _, matches, opts in FLEX_TUNING if matches(case)), None)


def choose(case: AttentionCase, prefer: str = "auto", flex_options="auto") -> Choice:
    """The kernel for ``case``; ``prefer`` is the ``attention_kernel`` option, ``flex_options`` the
    ``flex_kernel_options`` one."""
    if case.mask in ("none", "causal"):
        return Choice("sdpa", "no mask or causal: SDPA's flash/cuDNN kernels")
    if case.mask != "mask_mod":
        return Choice("sdpa", "mask reads data: SDPA with the mask tensor")
    if prefer == "sdpa":
        return Choice("sdpa", "attention_kernel='sdpa'")
    refusal = _flex_refusal(case, prefer)
    if refusal:
        return Choice("sdpa", refusal)
    return Choice("flex", "structured mask: FlexAttention skips fully masked blocks",
                  flex_kernel_options(case, flex_options))


def _flex_refusal(case: AttentionCase, prefer: str) -> str:
    if case.lowering != "inductor":
        return f"flex_attention needs the Inductor lowering, not {case.lowering!r}"
    if case.dropout:
        return "flex_attention has no dropout"
    if not case.static_shapes:
        return "symbolic shapes: the block mask is built for static lengths"
    if case.dtype not in FLEX_DTYPES:
        return f"flex_attention does not take {case.dtype}"
    d = case.head_dim
    if not (16 <= d <= 256 and d & (d - 1) == 0):
        return f"head dim {d} is not a power of two in 16..256"
    if not capabilities.flex_attention(case.device, case.train):
        return f"no flex_attention {'backward ' if case.train else ''}on {case.device.kind} {case.device.capability or ''}".rstrip()
    if case.device.kind == "cpu" and prefer != "flex":
        return "on the CPU flex is not measured faster; attention_kernel='flex' forces it"
    return ""
