"""The attention kernel table: which kernel one attention site gets, as data.

| mask                       | kernel                                   |
|----------------------------|------------------------------------------|
| none, or causal            | SDPA (``is_causal``): torch picks flash / cuDNN / memory-efficient |
| data-dependent tensor      | SDPA with the mask tensor                |
| a bool mask reading a per-row tensor (padding, document ids: ``data_masks.py``) | SDPA with the mask tensor; FlexAttention reading the tensor only under ``attention_kernel="flex"`` (measured slower for padding) |
| index arithmetic (``mask_mod``), or a softcap | FlexAttention with a cached block mask when all hold: Inductor lowering, static lengths, no dropout, fp16/bf16/fp32, head dim a power of two in 16..256, flex on the device (CUDA 8.0+, ROCm; the CPU for inference, only when ``attention_kernel="flex"``); else SDPA with the mask tensor (a softcapped site keeps its eager math) |

FA3 (``flash_attn_interface``) is not emitted: SDPA's flash kernel serves
the unmasked and causal cases (see ``docs/passes/attention.md``). Torch's
flash kernel with a window argument was measured slower than flex for
sliding windows on the H200 and is not a row.

Flex runs with its own heuristics (its ``kernel_options`` left unset): on the
H200 the backward block sizes that ran one Mistral-suite layer's fwd+bwd in
1.20 ms against 1.44 ms made no difference in the training step (13.88 vs
13.75 ms, ``bench/results/2026-12-01-h200-flex-options-models-train.md``),
so no tuned row ships. The ``flex_kernel_options`` option passes a dict to
every flex call for users who tune their own.

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
    reads_data: bool = False  # the mask_mod reads a per-row tensor (data_masks.py: padding, document ids)


@dataclass(frozen=True)
class Choice:
    kernel: str  # "sdpa" | "flex"
    why: str
    kernel_options: Optional[dict] = None  # flex_attention(kernel_options=...), for "flex"


def head_dim_of(q) -> int:
    """``q``'s head dim for the table: the int, or a symbolic one's hint (-1 without one).

    Reading the hint adds no guard; ``specialize_head_dim`` adds it once flex is chosen.
    """
    d = q.shape[-1]
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else -1


def specialize_head_dim(q) -> int:
    """Flex compiles one kernel per head dim: a symbolic head dim (``dynamic=True`` makes every dim symbolic)
    is guarded to its value, so another head dim recompiles and meets the table again. Lengths stay symbolic."""
    d = q.shape[-1]
    if isinstance(d, int):
        return d
    from torch.fx.experimental.symbolic_shapes import guard_int

    return guard_int(d)


def flex_kernel_options(case: AttentionCase, given="auto") -> Optional[dict]:
    """The ``kernel_options`` flex gets at ``case``: ``given`` when it is a dict; for ``"auto"`` None (flex's
    own heuristics: no options measured so far beat them in a model step, see the module docstring)."""
    if isinstance(given, dict):
        return dict(given) or None
    return None


def choose(case: AttentionCase, prefer: str = "auto", flex_options="auto") -> Choice:
    """The kernel for ``case``; ``prefer`` is the ``attention_kernel`` option, ``flex_options`` the
    ``flex_kernel_options`` one."""
    if case.mask in ("none", "causal"):
        return Choice("sdpa", "no mask or causal: SDPA's flash/cuDNN kernels")
    if case.mask != "mask_mod":
        return Choice("sdpa", "mask reads data: SDPA with the mask tensor")
    if prefer == "sdpa":
        return Choice("sdpa", "attention_kernel='sdpa'")
    if case.reads_data and prefer != "flex":
        return Choice("sdpa", "the mask reads a per-row tensor: flex measured slower for padding on the H200 "
                      "(0.40-0.54x, packed documents 1.03-1.12x); attention_kernel='flex' forces it")
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
    if not case.static_shapes and case.reads_data:
        return "symbolic shapes: a mask that reads a per-row tensor is lifted for static lengths only"
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
