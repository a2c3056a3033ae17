"""``attention-kernels``: apply the kernel table (``kernel_table.py``) to the attention sites.

``attention-to-sdpa`` (a pass) emits SDPA and, when the mask is index
arithmetic, tags the node with the lifted ``mask_mod``. Choosing the kernel
is the lowering's job: ``select_attention_kernels`` applies the table to
every tagged SDPA node before the graph is lowered, splicing in
``flex_attention`` where the table says so, and takes softcapped attention
(which SDPA cannot express) to ``flex_attention`` too (``softcap.py``).
"""

from __future__ import annotations

import torch
from torch import fx

from ...core import context
from ...core.devices import DeviceInfo
from ...core.graph import erase_dead, val
from ...core.rules import Matches
from ...core.target import Target
from . import data_masks, flex
from .kernel_table import AttentionCase, choose, head_dim_of
from .site import META_KEY, SdpaTag, sdpa_arguments
from .softcap import softcapped_to_flex

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _case_of(node: fx.Node, info: SdpaTag, device: DeviceInfo, lowering: str, train: bool) -> AttentionCase:
    q, k, v = (val(a) for a in node.args[:3])
    static = all(isinstance(d, int) for t in (q, k, v) for d in t.shape)
    return AttentionCase(
        device=device, dtype=q.dtype, head_dim=head_dim_of(q),
        mask=info.mask_kind, train=train,
        dropout=bool(sdpa_arguments(node).get("dropout_p", 0.0)), static_shapes=static and q.dim() == 4,
        lowering=lowering, score_mod=info.score_bias is not None, reads_data=info.data_mask is not None,
    )


def select_attention_kernels(
    gm: fx.GraphModule, device: DeviceInfo, lowering: str, prefer: str = "auto", train: bool = True,
    flex_options="auto",
) -> Matches:
    """Apply ``choose`` to every SDPA node the attention pass tagged; count the kernels spliced in.

    ``train``: a backward may run (grad mode on and an input that requires
    grad); the graph's fake values do not carry ``requires_grad``. ``flex_options``: the
    ``flex_kernel_options`` option (``"auto"``: flex's own heuristics).

    The decision and its reason land in the node's ``SdpaTag`` (``node.meta[META_KEY]``: ``kernel``, ``why``).
    """
    counts = {"flex": 0}
    for node in list(gm.graph.nodes):
        info = node.meta.get(META_KEY)
        if node.target is not SDPA or not isinstance(info, SdpaTag) or info.mask_kind != "mask_mod":
            continue
        choice = choose(_case_of(node, info, device, lowering, train), prefer, flex_options)
        info.kernel, info.why = choice.kernel, choice.why
        note = node.meta.get("kp_note", "")
        node.meta["kp_note"] = f"{note}; kernel: sdpa ({choice.why})"
        if choice.kernel != "flex":
            continue
        mask = sdpa_arguments(node).get("attn_mask")
        if info.data_mask is not None:
            data_masks.replace_sdpa(gm, node, info.data_mask, choice.kernel_options)
            refusal = None
        else:
            refusal = flex.replace_sdpa(gm, node, info.mask_mod, info.mask_mod_text, info.score_bias,
                                        choice.kernel_options)
        if refusal:
            info.kernel, info.why = "sdpa", refusal
            node.meta["kp_note"] = f"{note}; kernel: sdpa ({refusal})"
            continue
        if isinstance(mask, fx.Node):
            erase_dead([mask])
        counts["flex"] += 1
    ctx = context.current()
    notes = ctx.notes if ctx is not None else []
    counts["flex-softcap"] = softcapped_to_flex(gm, device, lowering, prefer, train, notes, flex_options)
    if counts["flex"] or counts["flex-softcap"]:
        gm.recompile()
    return Matches(counts)


def choose_attention_kernels(gm: fx.GraphModule) -> Matches:
    """The ``attention-kernels`` pass: ``select_attention_kernels`` for the graph's target.

    Reads ``context.current().target`` (device, training, lowering) and ``options["attention_kernel"]``,
    ``options["flex_kernel_options"]``;
    acts only on SDPA nodes ``attention-to-sdpa`` tagged with a lifted ``mask_mod``.

    Before (a tagged node, on a device whose table row allows FlexAttention)::

        %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, %mask)   # kp_attention: mask_mod

    After::

        %flex_attention = flex_attention(%q, %k, %v, %score_mod, (block mask))
    """
    ctx = context.current()
    target = ctx.target if ctx is not None and ctx.target is not None else Target(DeviceInfo("cpu"))
    options = getattr(ctx, "options", None)
    prefer = getattr(options, "attention_kernel", "auto")
    flex_options = getattr(options, "flex_kernel_options", "auto")
    return select_attention_kernels(gm, target.device, target.lowering, prefer, target.training, flex_options)
