"""Softcapped attention (Gemma2) straight to FlexAttention: the one kernel that expresses it.

``attention-to-sdpa`` matches ``softmax(tanh(s / cap) * cap + mask) @ v`` but
leaves it, since SDPA has no softcap. ``softcapped_to_flex`` (run by
``attention-kernels``, which owns the kernel choice) takes each such site to
``flex_attention`` with ``score_mod = tanh(score / cap) * cap`` (plus a lifted
bias) and the lifted mask as a block mask, when the kernel table allows flex
for the site (the same rows as a lifted SDPA mask) and the mask is proven;
otherwise the eager math stays, and the report says why.

Before (Gemma2's eager attention)::

    %mul = aten.mul.Tensor(%matmul, 0.0625)
    %div = aten.div.Tensor(%mul, 50.0)
    %tanh = aten.tanh.default(%div)
    %mul_1 = aten.mul.Tensor(%tanh, 50.0)
    %add = aten.add.Tensor(%mul_1, %where)          # where(keep, 0, finfo.min)
    %softmax = aten.softmax.int(%add, -1)
    %matmul_1 = aten.matmul.default(%softmax, %v)

After::

    %flex_attention = higher_order.flex_attention(%q, %k, %v, %score_mod, (block mask), 0.0625, ...)
    %getitem = getitem(%flex_attention, 0)   # score_mod: tanh(score / 50) * 50; mask_mod: kv_idx <= q_idx
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ...core.devices import DeviceInfo
from ...core.graph import alive, erase_dead, val
from . import flex
from .kernel_table import AttentionCase, choose, head_dim_of
from .layout import untranspose
from .mask_mod import describe, lift_mask_mod, memoized
from .match import SOFTMAX, match
from .score_mod import lift_score_bias
from .site import Attention

aten = torch.ops.aten


def softcapped_to_flex(gm: fx.GraphModule, device: DeviceInfo, lowering: str, prefer: str, train: bool,
                       notes: list, flex_options="auto") -> int:
    """Splice flex in for every softcapped attention the table and the proofs allow; how many."""
    done = 0
    with memoized():
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in SOFTMAX or not alive(node):
                continue
            att = match(node)
            if att is None or att.softcap is None:
                continue
            refusal = _to_flex(gm, att, device, lowering, prefer, train, flex_options)
            notes.append(f"{node.name}: softcapped attention (cap {att.softcap:g}) -> "
                         + ("flex_attention" if refusal is None else f"left as it is: {refusal}"))
            done += refusal is None
    return done


def _to_flex(gm: fx.GraphModule, att: Attention, device, lowering, prefer, train, flex_options) -> Optional[str]:
    q = val(att.q)
    if q.dim() != 4 or (att.space is not None and len(att.space) != q.dim()):
        return "flex_attention takes 4-D q, k, v"
    if att.sym_scales:
        return "the scale is a symbolic float"
    static = all(isinstance(d, int) for t in (att.q, att.v) for d in val(t).shape)
    case = AttentionCase(device=device, dtype=q.dtype, head_dim=head_dim_of(q), mask="mask_mod",
                         train=train, dropout=att.dropout_p > 0, static_shapes=static, lowering=lowering,
                         score_mod=True)
    choice = choose(case, prefer, flex_options)
    if choice.kernel != "flex":
        return choice.why
    g = gm.graph
    made = []
    with g.inserting_before(att.out):
        k = att.k if att.k is not None else untranspose(g, att.k_t)
        made += [k] if k is not att.k and k is not getattr(att.k_t, "args", [None])[0] else []
        keep = att.keep_mask
        if isinstance(keep, tuple):  # ("not", masked_out)
            keep = g.call_function(aten.logical_not.default, (keep[1],))
            keep.meta["val"] = val(keep.args[0])
            made.append(keep)
    L, S = q.shape[-2], val(k).shape[-2]
    mask_mod = lift_mask_mod(keep, L, S) if keep is not None else None
    score_bias = lift_score_bias(att.bias, L, S) if att.bias is not None else None
    refusal = ("the mask is not proven index arithmetic" if keep is not None and mask_mod is None
               else "the bias is not proven index arithmetic" if att.bias is not None and score_bias is None
               else None)
    scale = None if att.sqrt_head_dim is not None else att.scale
    if refusal is None:
        refusal = flex.splice(gm, att.out, att.q, k, att.v, scale=scale, gqa=False, mask_mod=mask_mod,
                              key=describe(mask_mod) if mask_mod is not None else "", score_bias=score_bias,
                              softcap=att.softcap, kernel_options=choice.kernel_options)
    if refusal is not None:
        erase_dead(made)
        return refusal
    erase_dead([att.out, *att.removed])
    return None
