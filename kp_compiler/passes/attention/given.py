"""SDPA calls already in the graph: a mask built by index arithmetic, proven and lifted.

transformers' default ``sdpa`` attention (and user code) builds the mask
itself and hands SDPA a dense ``attn_mask``: bool, or 0 where kept and a
large negative fill elsewhere; for GQA it repeats the heads of k and v,
since SDPA's masked kernel takes no ``enable_gqa``. ``lift_given_sdpa``
proves the mask with the lifts ``attention-to-sdpa`` uses for the naive
spellings (``mask_mod.py``, then ``value_masks.py``):

- a causal mask becomes ``is_causal=True``: the mask tensor and the head
  repeats go, ``enable_gqa=True`` comes instead;
- a mask that keeps every key (decode at length 1: a 1 x 1 grid) goes the
  same way without ``is_causal``: plain SDPA;
- any other lifted mask (sliding window, chunked) tags the node with its
  ``mask_mod`` for ``attention-kernels`` (FlexAttention with a block mask
  where the kernel table says so, else SDPA keeps the tensor);
- a bool mask that reads a per-row tensor (padding flags, document ids) at
  index positions is lifted with that read (``data_masks.py``), static
  lengths only; any other mask that reads data, or is not proven, is left
  as it is. With symbolic lengths only the op-by-op lift applies,
  and only to integer and boolean index arithmetic (``mask_mod.py``).

Before (transformers' sdpa path, Mistral's sliding window of 16)::

    %bitwise_and_1 = aten.bitwise_and.Tensor(%bitwise_and, %le) : b8[1, 1, 32, 32]
    %expand = aten.expand.default(%bitwise_and_1, [2, -1, 32, 32]) : b8[2, 1, 32, 32]
    %sdpa = aten.scaled_dot_product_attention.default(%q, %k_rep, %v_rep, attn_mask=%expand, scale=0.25)

After::

    %sdpa = aten.scaled_dot_product_attention.default(%q, %k_rep, %v_rep, attn_mask=%expand, scale=0.25)
        # mask_mod: (kv_idx > q_idx - 16) & (kv_idx <= q_idx)      (the tag attention-kernels reads)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ...core.graph import erase_dead, val
from .layout import gqa_source
from .mask_mod import EVERY_KEY_KEPT, describe, lift_mask_mod
from .scalars import bias_as_keep
from .sdpa_mask import CAUSAL_MASK_MODS, note, tag
from .data_masks import lift_data_mask
from .site import META_KEY, SdpaTag, sdpa_arguments

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def sdpa_with_mask(node: fx.Node) -> bool:
    """masked sdpa

    (An anchor of the attention passes: a ``scaled_dot_product_attention`` call with an ``attn_mask``.)
    """
    if "scaled_dot_product_attention" not in str(getattr(node.target, "__name__", node.target)):
        return False
    return sdpa_arguments(node).get("attn_mask") is not None


def _keep_node(g: fx.Graph, sdpa: fx.Node, mask: fx.Node) -> Optional[fx.Node]:
    """The boolean keep mask behind SDPA's ``attn_mask`` (bool, or 0 / fill), broadcasts dropped."""
    v = val(mask)
    if not isinstance(v, torch.Tensor):
        return None
    if v.dtype is not torch.bool:
        found = bias_as_keep(mask)
        if found is None:
            return None
        mask = found[0]
        if isinstance(mask, tuple):  # ("not", masked_out): one logical_not per mask, shared by the layers
            masked_out = mask[1]
            made = [u for u in masked_out.users if u.target is aten.logical_not.default]
            if made:
                mask = made[0]
            else:
                with g.inserting_after(masked_out):
                    mask = g.call_function(aten.logical_not.default, (masked_out,))
                mask.meta.update(val=val(masked_out), kp_made=True)
    while isinstance(mask, fx.Node) and mask.target in (aten.expand.default, aten.expand_as.default, aten.alias.default):
        mask = mask.args[0]
    return mask if isinstance(mask, fx.Node) and getattr(val(mask), "dtype", None) is torch.bool else None


def _drop_mask(sdpa: fx.Node, keep: fx.Node, causal: bool) -> None:
    """No mask (``is_causal=True`` if ``causal``); GQA heads from their source when k and v repeat them."""
    args = sdpa_arguments(sdpa)
    q, k, v = sdpa.args[:3]
    dropped = [args["attn_mask"], keep, k, v]
    del args["attn_mask"]
    if causal:
        args["is_causal"] = True
    k0, v0 = gqa_source(k), gqa_source(v)
    if k0 and v0 and k0[1] == v0[1] and not args.get("enable_gqa"):
        k, v, args["enable_gqa"] = k0[0], v0[0], True
    sdpa.args, sdpa.kwargs = (q, k, v), args
    erase_dead(dropped)  # only what nothing else reads any more (other layers share the mask)


def _lift_data_mask(node: fx.Node, mask: fx.Node, keep: Optional[fx.Node], B, L, S) -> Optional[str]:
    """A bool mask reading a per-row tensor (padding, document ids): tagged with its ``DataMask``, or None."""
    if keep is None or getattr(val(mask), "dtype", None) is not torch.bool:
        return None  # an additive mask gives a row with no key uniform weights, flex zeros: left alone
    dm = lift_data_mask(keep, L, S, B)
    if dm is None:
        return None
    node.meta[META_KEY] = SdpaTag("mask-tensor", "mask_mod", dm.mask_mod, dm.text, data_mask=dm)
    node.meta["kp_note"] = f"mask_mod: {dm.text} (reads {', '.join(d.name for d in dm.data)})"
    return "sdpa-data-mask"


def lift_given_sdpa(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Lift one SDPA call's ``attn_mask``: ``"sdpa-causal"``, ``"sdpa-no-mask"``, ``"sdpa-mask_mod"``, ``"sdpa-data-mask"`` (it reads
    a per-row tensor, ``data_masks.py``), or None (left alone)."""
    if node.target is not SDPA or node.meta.get(META_KEY) is not None or not sdpa_with_mask(node):
        return None
    args = sdpa_arguments(node)
    mask = args["attn_mask"]
    if args.get("is_causal") or not isinstance(mask, fx.Node):
        return None
    q, k = val(node.args[0]), val(node.args[1])
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4:
        return None
    L, S = q.shape[-2], k.shape[-2]
    keep = _keep_node(gm.graph, node, mask)
    mask_mod = lift_mask_mod(keep, L, S) if keep is not None else None
    if mask_mod is None:
        return _lift_data_mask(node, mask, keep, q.shape[0], L, S)
    if describe(mask_mod) == EVERY_KEY_KEPT:
        _drop_mask(node, keep, causal=False)
        node.meta[META_KEY] = tag("no-mask", None)
        node.meta["kp_note"] = "attn_mask proven to keep every key: dropped"
        return "sdpa-no-mask"
    if describe(mask_mod) in CAUSAL_MASK_MODS:
        _drop_mask(node, keep, causal=True)
        node.meta[META_KEY] = tag("causal", None)
        node.meta["kp_note"] = "attn_mask proven causal: is_causal"
        return "sdpa-causal"
    node.meta[META_KEY] = info = tag("mask-tensor", mask_mod)
    node.meta["kp_note"] = note(info)
    return "sdpa-mask_mod"
