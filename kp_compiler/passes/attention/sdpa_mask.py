"""What SDPA gets for a matched attention's mask, and what the lowering is told about it.

``sdpa_mask`` turns the matched keep mask, fill and bias into SDPA's
``(attn_mask, is_causal)``: ``is_causal`` when the mask is proven causal (or
is a registered ``tril`` buffer, under a runtime guard), else a mask tensor.
Along the way it lifts index-arithmetic masks and biases into a ``mask_mod``
and ``score_mod`` (``mask_mod.py``, ``score_mod.py``) and decides whether
rows with no key must keep eager's NaN. ``tag`` and ``note`` record that on
the SDPA node for ``passes/attention/kernels.py`` and for the dumps.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch._subclasses.fake_tensor import is_fake

from ...core import context
from ...core.graph import val
from .masks import holds_lower_triangle, is_causal_keep_mask, tril_buffer_source
from .mask_mod import describe, every_row_attends, lift_mask_mod
from .score_mod import describe_bias, lift_score_bias
from .site import Attention, SdpaTag

aten = torch.ops.aten
CAUSAL_MASK_MODS = ("kv_idx <= q_idx", "q_idx >= kv_idx")  # describe() spellings of a causal mask


def _guarded_tril_buffer(keep, L, S) -> bool:
    """A registered ``tril`` buffer sliced ``[:L, :S]`` (nanoGPT): causal while it is unchanged.

    Only with ``options["constant_buffers"]=True``: a write through ``.data``
    (``m.bias.data.fill_(1)``) changes no version counter, so no runtime check
    short of reading the buffer on every call sees it. With the option the
    example value is checked and guarded at run time (same tensor, same
    version counter: ordinary in-place writes are seen and the compiled graph
    falls back); without it the mask stays a tensor read on every call, and
    the pass says how to opt in.
    """
    ctx = context.current()
    buffer = tril_buffer_source(keep, L, S)
    if ctx is None or buffer is None:
        return False
    value = ctx.example_value(buffer)
    if not isinstance(value, torch.Tensor) or not holds_lower_triangle(value):
        if isinstance(value, torch.Tensor) and is_fake(value):
            ctx.notes.append(f"{buffer.name}'s value could not be checked for a lower triangle: the example inputs "
                             "are fake (a graph split by Dynamo's DDP optimizer); the mask stays a tensor read")
        return False
    if not ctx.constant_buffers:
        ctx.notes.append(f"{buffer.name} holds a lower triangle: with options['constant_buffers']=True the mask "
                         "becomes is_causal (then a write to it through .data is not seen)")
        return False
    ctx.guard_unchanged(buffer, f"{buffer.name} holds a lower triangle (causal mask)")
    return True

def _lift_bias(att: Attention, keep, L, S) -> None:
    """ALiBi-like biases: a score_mod (and the keep mask as a mask_mod) for FlexAttention, when both lift."""
    bias_fn = lift_score_bias(att.bias, L, S)
    if bias_fn is None:
        return
    mask_fn = lift_mask_mod(keep, L, S) if keep is not None else None
    if keep is not None and (mask_fn is None or not every_row_attends(mask_fn, L, S)):
        return
    att.lifted, att.score_bias = mask_fn, bias_fn

def sdpa_mask(g: fx.Graph, att: Attention, L, S, dtype):
    """(attn_mask, is_causal) for SDPA from the matched keep mask, fill and bias."""
    keep = att.keep_mask
    if att.bias is None and keep is not None and _guarded_tril_buffer(keep, L, S):
        return None, True
    if isinstance(keep, tuple):
        keep = g.call_function(aten.logical_not.default, (keep[1],))
    if att.bias is None and keep is not None and is_causal_keep_mask(keep, L, S):
        return None, True  # no row is fully masked, so -inf and a finite fill agree
    if att.bias is None and keep is not None:
        att.lifted = lift_mask_mod(keep, L, S)  # index arithmetic: lowering may choose FlexAttention
        if att.lifted is not None and describe(att.lifted) in CAUSAL_MASK_MODS:
            return None, True  # e.g. transformers' 4-D mask from arange; no row is empty
    if att.bias is not None:
        _lift_bias(att, keep, L, S)
    if keep is not None and att.fill == -math.inf and not (att.lifted and every_row_attends(att.lifted, L, S)):
        att.nan_rows = keep
    if att.bias is None and att.fill == -math.inf:
        return keep, False
    bias = att.bias
    if bias is not None and (val(bias) is None or val(bias).dtype != dtype):
        bias = g.call_function(aten.to.dtype, (bias, dtype))
    if keep is None:
        return bias, False
    masked_out = g.call_function(aten.logical_not.default, (keep,))
    if bias is not None and not att.fill_then_bias:
        return g.call_function(aten.masked_fill.Scalar, (bias, masked_out, att.fill)), False
    zeros = g.call_function(aten.zeros_like.default, (keep,), {"dtype": dtype})
    fill = g.call_function(aten.masked_fill.Scalar, (zeros, masked_out, att.fill))
    return (fill if bias is None else g.call_function(aten.add.Tensor, (bias, fill))), False

def tag(kind: str, mask_mod, score_bias=None) -> SdpaTag:
    """What the kernel choice (``passes/attention/kernels.py``) reads off the SDPA node.

    ``mask_mod`` may be None with a ``score_bias`` (a bias and no boolean mask): no block mask then.
    """
    if (mask_mod is not None or score_bias is not None) and kind != "causal":
        return SdpaTag(kind, "mask_mod", mask_mod, describe(mask_mod) if mask_mod is not None else "",
                       score_bias, describe_bias(score_bias) if score_bias else "")
    return SdpaTag(kind, {"causal": "causal", "no-mask": "none"}.get(kind, "tensor"))


def note(info: SdpaTag) -> str:
    parts = [f"mask_mod: {info.mask_mod_text}"] if info.mask_mod_text else []
    parts += [f"score_mod: score + {info.score_bias_text}"] if info.score_bias_text else []
    return "; ".join(parts)
