"""Built-in rewrite passes, registered in their default order on import.

This file is the one place that registers and orders them.
"""

from ..core.pass_manager import register_pass
from .attention.given import sdpa_with_mask
from .attention.match import attention_to_sdpa
from .attention.kernels import choose_attention_kernels
from .fp8.linear import convert_fp8_linears, fp8_applies
from .linear.activation import applies as _activation_applies, linear_activation
from .linear.group import applies as _group_applies, linear_group
from .loss import linear_cross_entropy as _lce
from .moe.dispatch import moe_dispatch
from .cleanup.noop import noop_elimination

# Anchors: what a Dynamo graph must call for the pass to have work (core/pass_manager.register_pass).
# noop-elimination only clears the way for the others (Inductor and XLA drop no-ops themselves; the eager
# lowering, a debugging aid, keeps them), so alone it is no reason to canonicalize a graph.
register_pass("noop-elimination", noop_elimination, default=True, anchors=())
register_pass("attention-to-sdpa", attention_to_sdpa, default=True, anchors=("softmax", sdpa_with_mask))
# The kernel for each SDPA node attention-to-sdpa tagged with a lifted mask: SDPA or FlexAttention (the table
# in attention/kernel_table.py, read against the target's device row).
register_pass("attention-kernels", choose_attention_kernels, default=True, anchors=("softmax", sdpa_with_mask))
# Default, but the backend leaves it out where no fused kernel would run the op (lowering/moe.py).
register_pass("moe-dispatch", moe_dispatch, default=True, anchors=("topk",))
# Opt-in until a fused kernel is measured faster than Inductor's own linear + pointwise (issue 19).
register_pass("linear-activation", linear_activation, anchors=("linear",), applies=_activation_applies)
# The linears of one input as one few-row launch: only under mode="reduce-overhead" on CUDA (issue 18).
register_pass("linear-group", linear_group, default=True, anchors=("linear",), applies=_group_applies)
register_pass("linear-cross-entropy", _lce.linear_cross_entropy, default=True, anchors=("cross_entropy",),
              applies=_lce.applies)
# Last: it converts the linears the others left. Only with options["fp8"] (its applies says so otherwise).
register_pass("fp8-linear", convert_fp8_linears, default=True, anchors=("linear",), applies=fp8_applies)
