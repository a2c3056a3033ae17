"""One matched attention site: what ``attention-to-sdpa`` found (``match.py``) and what the SDPA emission reads.

``sdpa_mask.py`` turns its mask fields into what SDPA gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import fx


@dataclass
class Attention:
    q: fx.Node
    k_t: Optional[fx.Node]  # the right operand of q @ k^T (matmul spellings)
    v: fx.Node
    out: fx.Node
    scale: float = 1.0
    keep_mask: Optional[fx.Node] = None  # bool, True = attend
    fill: float = -math.inf  # what masked-out scores were set to
    fill_then_bias: bool = False  # masked_fill before the bias add: masked scores = fill + bias
    bias: Optional[fx.Node] = None  # additive float mask
    dropout_p: float = 0.0
    removed: list = field(default_factory=list)
    k: Optional[fx.Node] = None  # k itself, [..., S, E] (einsum spellings)
    sqrt_head_dim: Optional[fx.Node] = None  # scores were divided by sqrt(E), E symbolic
    space: Optional[tuple] = None  # scores' shape where the mask/bias applies, if views regroup batch dims
    lifted: Optional[object] = None  # the keep mask as a mask_mod, when it is index arithmetic
    score_bias: Optional[object] = None  # the bias as bias_fn(b, h, q_idx, kv_idx), when it is index arithmetic
    nan_rows: Optional[fx.Node] = None  # keep mask whose fully masked rows must come out NaN, as in eager
    sym_scales: list = field(default_factory=list)  # (SymFloat node, multiplies?): scalings not known as numbers
    softcap: Optional[float] = None  # scores went through tanh(s / cap) * cap before any mask (Gemma2)
    qk_bias: Optional[fx.Node] = None  # baddbmm(bias, q, k^T): the bias added to the product (BLOOM's ALiBi)


META_KEY = "kp_attention"  # node.meta key of an SdpaTag, on the SDPA nodes attention-to-sdpa emits


@dataclass
class SdpaTag:
    """What ``attention-to-sdpa`` tells the later ``attention-kernels`` pass about one SDPA node it emitted.

    Stored as ``node.meta[META_KEY]``. ``mask_kind`` is what the kernel table
    keys on; only ``"mask_mod"`` nodes (a mask or bias lifted to index
    arithmetic) can move to FlexAttention. ``kernel``/``why`` are filled in
    by ``attention-kernels``.
    """

    mask: str  # the report's match kind: "causal", "mask-tensor", "no-mask"
    mask_kind: str  # "causal", "none", "tensor", or "mask_mod"
    mask_mod: Optional[object] = None  # mask_mod(b, h, q_idx, kv_idx) -> bool, or None (a bias alone)
    mask_mod_text: str = ""
    score_bias: Optional[object] = None  # bias_fn(b, h, q_idx, kv_idx), for a score_mod
    score_bias_text: str = ""
    data_mask: Optional[object] = None  # a data_masks.DataMask: the mask_mod reads a per-row tensor
    kernel: str = ""  # "sdpa" or "flex", once attention-kernels chose
    why: str = ""


SDPA_POSITIONAL = ("attn_mask", "dropout_p", "is_causal")  # SDPA's arguments after q, k, v that may be positional


def sdpa_arguments(node: fx.Node) -> dict:
    """An SDPA call's arguments after q, k, v, by name (``make_fx`` may pass ``attn_mask``, ``dropout_p`` and
    ``is_causal`` positionally)."""
    return {**dict(zip(SDPA_POSITIONAL, node.args[3:])), **node.kwargs}
