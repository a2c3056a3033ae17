"""Built-in rewrite passes, registered in their default order on import.

Each module holds one pass; this file is the one place that orders them.
"""

from ..core.pass_manager import register_pass
from .attention import attention_to_sdpa
from .moe import moe_dispatch
from .noop import noop_elimination

# Anchors: what a Dynamo graph must call for the pass to have work (core/pass_manager.register_pass).
# noop-elimination only clears the way for the others (Inductor and XLA drop no-ops themselves; the eager
# lowering, a debugging aid, keeps them), so alone it is no reason to canonicalize a graph.
register_pass("noop-elimination", noop_elimination, default=True, anchors=())
register_pass("attention-to-sdpa", attention_to_sdpa, default=True, anchors=("softmax",))
# Default, but the backend leaves it out where no fused kernel would run the op (lowering/moe.py).
register_pass("moe-dispatch", moe_dispatch, default=True, anchors=("topk",))
