"""Masks built outside a checkpointed layer, computed again inside it so the attention passes can read them.

transformers builds the causal (and sliding-window) mask once per forward, outside its decoder layers, and
hands it to each layer; with every layer checkpointed, a body sees that mask as an input whose structure it
cannot prove, and the attention passes leave it alone. ``cones`` finds, for each boolean or integer argument
of a checkpoint that the graph computes (not a graph input), the nodes that compute it (at most ``LIMIT``,
none needing a gradient, none writing anything); ``inline`` copies them into the canonical body, whose new
inputs are what they read. ``checkpoint_bodies.rewrite`` keeps such a body only where the passes made every
copied node dead (the mask became ``is_causal`` or a block mask), so a body never computes a mask per layer
that the graph computes once.

Before (the graph)::

    %causal = aten.le.Tensor(%kv_idx, %q_idx)  ...
    %autograd_region = kp.autograd_region([%x, %causal, %w_q, ...], [], 3)

The body, after ``inline`` (its input for ``%causal`` no longer read)::

    %kv_idx_in = input()   ...
    %le = aten.le.Tensor(%kv_idx_in, %q_idx_in)   # the copied cone, read by the attention in the body
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from . import regions
from .graph import val

LIMIT = 64


def _cone(arg: fx.Node) -> Optional[tuple[list, list]]:
    """``(nodes, leaves)`` computing ``arg`` in its graph, or None where that is not a mask to copy."""
    v = val(arg)
    if arg.op != "call_function" or not isinstance(v, torch.Tensor) or v.is_floating_point() or v.is_complex():
        return None
    nodes, leaves, seen, stack = set(), [], set(), [arg]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        value = val(n)
        pure = n.op == "call_function" and n.target is not regions.REGION_OP \
            and not getattr(getattr(n.target, "_schema", None), "is_mutable", False)
        needs_grad = isinstance(value, torch.Tensor) and value.requires_grad
        if not pure or needs_grad:
            if n is arg or not isinstance(value, (torch.Tensor, torch.SymInt)):
                return None
            leaves.append(n)
            continue
        nodes.add(n)
        if len(nodes) > LIMIT:
            return None
        stack += [a for a in n.all_input_nodes]
    order = {n: i for i, n in enumerate(arg.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def cones(node: fx.Node, region) -> dict:
    """``{position of the body input: (nodes, leaves)}`` for the checkpoint stand-in ``node``."""
    tensors, ints, _ = node.args
    args = region.call_args(regions._values(list(tensors), list(ints), region.order))
    out = {}
    for i, a in enumerate(args):
        if isinstance(a, fx.Node):
            found = _cone(a)
            if found is not None:
                out[i] = found
    return out


def inline(body: fx.GraphModule, found: dict) -> tuple[set, list]:
    """Copy each cone of ``found`` into the canonical ``body`` in place of the input it computes; returns the
    copied nodes and the leaves (graph nodes) the body now reads, in the order of its new placeholders."""
    places = list(body.graph.find_nodes(op="placeholder"))
    leaves: list = []
    for _, (_, ls) in sorted(found.items()):
        leaves += [leaf for leaf in ls if leaf not in leaves]
    env, last = {}, places[-1]
    for leaf in leaves:
        with body.graph.inserting_after(last):
            last = body.graph.placeholder(f"{leaf.name}_in")
        last.meta["val"] = val(leaf)
        env[leaf] = last
    copied: set = set()
    first = next(n for n in body.graph.nodes if n.op != "placeholder")
    for position, (nodes, _) in sorted(found.items()):
        for n in nodes:
            if n in env:
                continue
            with body.graph.inserting_before(first):
                env[n] = body.graph.node_copy(n, lambda a: env[a])
            copied.add(env[n])
        target = nodes[-1] if nodes else None
        if target is not None:
            places[position].replace_all_uses_with(env[target])
    body.graph.lint()
    body.recompile()
    return copied, leaves


def pass_leaves(node: fx.Node, region, leaves: list) -> None:
    """Hand the checkpoint the leaves ``inline`` made its body read, after its other inputs."""
    tensors, ints, key = node.args
    tensors, ints, order, args = list(tensors), list(ints), list(region.order), list(region.args)
    for leaf in leaves:
        if isinstance(val(leaf), torch.Tensor):
            tensors.append(leaf)
            order.append(("t", len(tensors) - 1))
        else:
            ints.append(leaf)
            order.append(("i", len(ints) - 1))
        args.append((regions._SLOT, len(order) - 1))
    node.args = (tensors, ints, key)
    region.order, region.args = tuple(order), tuple(args)
