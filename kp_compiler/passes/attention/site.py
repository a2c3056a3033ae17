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
