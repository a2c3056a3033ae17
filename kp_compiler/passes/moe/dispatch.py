"""``moe-dispatch``: every recognized expert block onto one ``kp::routed_experts`` op.

One recognizer (``recognize``) over the three forms the pass knows, each
returning the same ``Experts`` description, and one emitter (``common.emit``):

- ``loop.py``: an unrolled expert loop, a chain of ``index_add`` (ends at the last one);
- ``batched.py``: transformers v5's ``batched_mm`` / ``grouped_mm`` experts (end in a sum over k);
- ``dense.py``: every expert on every token, then masked (ends in a sum over experts).

Before (the loop form, one of E steps; see each form's module for its own)::

    %index_add = aten.index_add.default(%zeros_like, 0, %getitem_2, %mul_1) : f32[10, 16]

After::

    %routed_experts = kp.routed_experts.default(%x, %ids, %weights, [%w_gate_0, ...], [%w_up_0, ...], [%w_down_0, ...], 'silu') : f32[10, 16]
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import alive
from ...core.pattern import is_call
from ...core.rules import Matches
from . import batched, dense, loop
from .common import Experts, emit
from .tables import tabulate

aten = torch.ops.aten

GROUPED_MM_ENV = "KP_MOE_REWRITE_GROUPED_MM"
GROUPED_MM_KEPT = ("transformers grouped_mm experts left as they are in this training graph: the routed op's "
                   "training step measured slower than Inductor's there (H200, Qwen3-MoE suite: see "
                   "docs/passes/moe.md); options['moe_grouped_mm']='rewrite' (or "
                   f"{GROUPED_MM_ENV}=1) rewrites them anyway")
AUTOCAST_KEPT = ("expert block left as it is: torch.autocast is on for this graph, and kp::routed_experts has no "
                 "autocast rule (its tokens and weights would stay fp32 where eager runs the linears in the autocast "
                 "dtype)")
GROUPED_MM_KEPT_BY_OPTION = "transformers grouped_mm experts left as they are (options['moe_grouped_mm']='keep')"


def _grouped_mm_choice(ctx) -> "str | None":
    """None where transformers' grouped_mm form is rewritten, else the note saying why it is kept."""
    choice = getattr(getattr(ctx, "options", None), "moe_grouped_mm", "auto")
    if choice == "rewrite" or os.environ.get(GROUPED_MM_ENV, "0") == "1":
        return None
    if choice == "keep":
        return GROUPED_MM_KEPT_BY_OPTION
    target = getattr(ctx, "target", None)
    return GROUPED_MM_KEPT if target is None or target.training else None


def recognize(node: fx.Node, misses: Optional[list] = None) -> Iterator[Experts]:
    """The expert blocks ending at ``node``, in the order to try them (at most one per form); a near-miss's
    failed link is appended to ``misses``."""
    if is_call(node, *loop.COMBINES):
        if any(is_call(u, *loop.COMBINES) and u.args[0] is node for u in node.users):
            return  # not the end of a chain
        found = loop.match(node, misses)
        if found is not None:
            yield found
    elif is_call(node, aten.sum.dim_IntList):
        found = batched.match(node, misses)
        if found is not None:
            yield found
        found = dense.match(node)
        if found is not None:
            yield found
    elif is_call(node, aten.einsum.default):
        found = dense.match_einsum(node)
        if found is not None:
            yield found


def moe_dispatch(gm: fx.GraphModule) -> Matches:
    """Rewrite every provable expert block in ``gm``; matches counted per kind (``Experts.kind``).

    transformers' ``grouped_mm`` experts already run as grouped GEMMs: that form is rewritten in inference
    graphs and kept in training graphs (``options["moe_grouped_mm"]``: ``"auto"``; ``"keep"``, ``"rewrite"`` or
    ``KP_MOE_REWRITE_GROUPED_MM=1`` force one; the report's notes say when one was kept and why). A graph with
    no known target (a pass run by hand) keeps it.

    Under ``torch.autocast`` (``Target.autocast``) nothing is rewritten and the report says why: the op has no
    autocast rule, so it would compute in fp32 where eager computes in the autocast dtype.

    In an inference graph for CUDA, the ops then read their expert weights through address tables made now
    (``tables.py``): 3 x E tensors passed per call cost more host time than a decode step's kernels.
    """
    counts: dict = {}
    notes: list = []
    ctx = context.current()
    grouped_kept = _grouped_mm_choice(ctx)
    target = getattr(ctx, "target", None)
    training = target is not None and target.training
    for node in reversed(list(gm.graph.nodes)):
        if not alive(node):
            continue
        for experts in recognize(node, notes):
            if target is not None and target.autocast:
                if AUTOCAST_KEPT not in notes:
                    notes.append(AUTOCAST_KEPT)
                break
            if experts.grouped and grouped_kept:
                notes.append(grouped_kept)
                break
            if emit(gm, experts, training):
                counts[experts.kind] = counts.get(experts.kind, 0) + 1
                break
    if counts:
        notes += tabulate(gm)[1]  # inference graphs on CUDA: weights through address tables (tables.py)
        gm.recompile()
    return Matches(counts, notes)
