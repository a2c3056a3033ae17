"""Attention kernel choice: a table over device, dtype, head dim and mask kind.

``attention-to-sdpa`` (a pass) emits SDPA and, when the mask is index
arithmetic, tags the node with the lifted ``mask_mod``. Choosing the kernel
is the lowering's job: ``choose(case)`` is the table, and
``select_attention_kernels`` applies it to every tagged SDPA node before the
graph is lowered, splicing in ``flex_attention`` where the table says so.

| mask                       | kernel                                   |
|----------------------------|------------------------------------------|
| none, or causal            | SDPA (``is_causal``): torch picks flash / cuDNN / memory-efficient |
| data-dependent tensor      | SDPA with the mask tensor                |
| index arithmetic (``mask_mod``) | FlexAttention with a cached block mask when all hold: Inductor lowering, static lengths, no dropout, fp16/bf16/fp32, head dim a power of two in 16..256, flex on the device (CUDA 8.0+, ROCm; the CPU for inference, only when ``attention_kernel="flex"``); else SDPA with the mask tensor |

FA3 (``flash_attn_interface``) is not emitted: SDPA's flash kernel serves
the unmasked and causal cases (see ``docs/passes/attention.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ...core import context
from ...core import devices as capabilities
from ...core.devices import DeviceInfo
from ...core.graph import val
from ...core.graph import erase_dead
from ...core.rules import Matches
from ...core.target import Target
from . import flex
from .site import META_KEY, SdpaTag

SDPA = torch.ops.aten.scaled_dot_product_attention.default
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


@dataclass(frozen=True)
class Choice:
    kernel: str  # "sdpa" | "flex"
    why: str


def choose(case: AttentionCase, prefer: str = "auto") -> Choice:
    """The kernel for ``case``; ``prefer`` is the ``attention_kernel`` option."""
    if case.mask in ("none", "causal"):
        return Choice("sdpa", "no mask or causal: SDPA's flash/cuDNN kernels")
    if case.mask != "mask_mod":
        return Choice("sdpa", "mask reads data: SDPA with the mask tensor")
    if prefer == "sdpa":
        return Choice("sdpa", "attention_kernel='sdpa'")
    refusal = _flex_refusal(case, prefer)
    if refusal:
        return Choice("sdpa", refusal)
    return Choice("flex", "structured mask: FlexAttention skips fully masked blocks")


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


def _case_of(node: fx.Node, info: SdpaTag, device: DeviceInfo, lowering: str, train: bool) -> AttentionCase:
    q, k, v = (val(a) for a in node.args[:3])
    static = all(isinstance(d, int) for t in (q, k, v) for d in t.shape)
    return AttentionCase(
        device=device, dtype=q.dtype, head_dim=q.shape[-1] if isinstance(q.shape[-1], int) else -1,
        mask=info.mask_kind, train=train,
        dropout=bool(node.kwargs.get("dropout_p", 0.0)), static_shapes=static and q.dim() == 4,
        lowering=lowering,
    )


def select_attention_kernels(
    gm: fx.GraphModule, device: DeviceInfo, lowering: str, prefer: str = "auto", train: bool = True
) -> Matches:
    """Apply ``choose`` to every SDPA node the attention pass tagged; count the kernels spliced in.

    ``train``: a backward may run (grad mode on and an input that requires
    grad); the graph's fake values do not carry ``requires_grad``.

    The decision and its reason land in the node's ``SdpaTag`` (``node.meta[META_KEY]``: ``kernel``, ``why``).
    """
    counts = {"flex": 0}
    for node in list(gm.graph.nodes):
        info = node.meta.get(META_KEY)
        if node.target is not SDPA or not isinstance(info, SdpaTag) or info.mask_kind != "mask_mod":
            continue
        choice = choose(_case_of(node, info, device, lowering, train), prefer)
        info.kernel, info.why = choice.kernel, choice.why
        note = node.meta.get("kp_note", "")
        node.meta["kp_note"] = f"{note}; kernel: sdpa ({choice.why})"
        if choice.kernel != "flex":
            continue
        mask = node.kwargs.get("attn_mask")
        refusal = flex.replace_sdpa(gm, node, info.mask_mod, info.mask_mod_text, info.score_bias)
        if refusal:
            info.kernel, info.why = "sdpa", refusal
            node.meta["kp_note"] = f"{note}; kernel: sdpa ({refusal})"
            continue
        if isinstance(mask, fx.Node):
            erase_dead([mask])
        counts["flex"] += 1
    if counts["flex"]:
        gm.recompile()
    return Matches(counts)


def choose_attention_kernels(gm: fx.GraphModule) -> Matches:
    """The ``attention-kernels`` pass: ``select_attention_kernels`` for the graph's target.

    Reads ``context.current().target`` (device, training, lowering) and ``options["attention_kernel"]``;
    acts only on SDPA nodes ``attention-to-sdpa`` tagged with a lifted ``mask_mod``.

    Before (a tagged node, on a device whose table row allows FlexAttention)::

        %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, %mask)   # kp_attention: mask_mod

    After::

        %flex_attention = flex_attention(%q, %k, %v, %score_mod, (block mask))
    """
    ctx = context.current()
    target = ctx.target if ctx is not None and ctx.target is not None else Target(DeviceInfo("cpu"))
    prefer = getattr(getattr(ctx, "options", None), "attention_kernel", "auto")
    return select_attention_kernels(gm, target.device, target.lowering, prefer, target.training)
