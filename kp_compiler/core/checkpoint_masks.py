"""Masks built outside a checkpointed layer, computed again inside it so the attention passes can read them.

transformers builds the causal (and sliding-window) mask once per forward, outside its decoder layers, and
hands it to each layer; with every layer checkpointed, a body sees that mask as an input whose structure it
cannot prove, and the attention passes leave it alone. ``cones`` finds, for each argument of a checkpoint that
the graph computes (not a graph input), the nodes that compute it (at most ``LIMIT``, none needing a gradient,
none random, none writing anything): boolean and integer masks, and float ones computed from integers and
constants alone (the additive ``where(keep, 0, finfo.min)`` mask of eager attention: Gemma2's softcapped
layers); ``inline`` copies them into the canonical body, whose new inputs are what they read.
``checkpoint_bodies.rewrite`` keeps such a body only where the passes made every copied node dead (the mask
became ``is_causal`` or a block mask), so a body never computes a mask per layer that the graph computes once;
where only some copies died, it runs the body again with those alone (``dead``).

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
from .graph import erase_dead, val

LIMIT = 64


def _cone(arg: fx.Node) -> Optional[tuple[list, list]]:
    """``(nodes, leaves)`` computing ``arg`` in its graph, or None where that is not a mask to copy."""
    v = val(arg)
    if arg.op != "call_function" or not isinstance(v, torch.Tensor) or v.is_complex():
        return None
    nodes, leaves, seen, stack = set(), [], set(), [arg]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        value = val(n)
        pure = (n.op == "call_function" and n.target is not regions.REGION_OP and not _seeded(n)
                and (not getattr(getattr(n.target, "_schema", None), "is_mutable", False) or _fresh_detach(n))) \
            or _constant(n)
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
    if v.is_floating_point() and any(isinstance(val(leaf), torch.Tensor) and val(leaf).is_floating_point()
                                     for leaf in leaves):
        return None  # a float that reads float tensors (an activation, rotary tables): not index arithmetic
    order = {n: i for i, n in enumerate(arg.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def _seeded(n: fx.Node) -> bool:
    """A random op (``rand``, ``bernoulli``): a copy would draw other numbers than the graph's, so it is read from
    outside (a leaf), never copied."""
    return torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())


def _constant(n: fx.Node) -> bool:
    """A tensor attribute of the graph that needs no gradient (``torch.tensor(finfo.min)`` in a mask)."""
    if n.op != "get_attr":
        return False
    value = _attribute(n)
    return isinstance(value, torch.Tensor) and not value.requires_grad


def _fresh_detach(n: fx.Node) -> bool:
    """``detach_`` of a fresh copy of a constant: how Dynamo spells ``torch.tensor(x)``; it writes nothing
    another node reads."""
    return n.target is torch.ops.aten.detach_.default and isinstance(n.args[0], fx.Node) \
        and n.args[0].target is torch.ops.aten.lift_fresh_copy.default


def _attribute(n: fx.Node):
    obj = n.graph.owning_module
    for part in str(n.target).split("."):
        obj = getattr(obj, part, None)
    return obj


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


def inline(body: fx.GraphModule, found: dict) -> tuple[set, list, dict]:
    """Copy each cone of ``found`` into the canonical ``body`` in place of the input it computes; returns the
    copied nodes, the leaves (graph nodes) the body now reads, in the order of its new placeholders, and
    ``{position: the copy that computes that input}``."""
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
    targets: dict = {}
    first = next(n for n in body.graph.nodes if n.op != "placeholder")
    for position, (nodes, _) in sorted(found.items()):
        for n in nodes:
            if n in env:
                continue
            with body.graph.inserting_before(first):
                env[n] = body.graph.node_copy(n, lambda a: env[a])
            if n.op == "get_attr":  # the constant goes with its copy (dropped by ``sweep`` once unread)
                name = regions._free_name(body, "kp_mask_constant_" + str(n.target).replace(".", "_"))
                setattr(body, name, _attribute(n))
                env[n].target = name
            copied.add(env[n])
        target = nodes[-1] if nodes else None
        if target is not None:
            places[position].replace_all_uses_with(env[target])
            targets[position] = env[target]
    body.graph.lint()
    body.recompile()
    return copied, leaves, targets


def sweep(body: fx.GraphModule, copied: set) -> None:
    """Erase the copies the passes left unread (a ``detach_`` is not dead code to fx; these are copies of pure
    nodes or of ``_fresh_detach`` ones), then the constants ``inline`` gave ``body`` that nothing reads."""
    alive = set(body.graph.nodes)
    erase_dead([n for n in copied if n in alive and n.op == "call_function"])
    for n in [n for n in body.graph.nodes if n in copied and n.op == "get_attr" and not n.users]:
        body.graph.erase_node(n)
    read = {str(n.target) for n in body.graph.nodes if n.op == "get_attr"}
    for name in {str(n.target) for n in copied if n.op == "get_attr"} - read:
        delattr(body, name)


def dead(found: dict, body: fx.GraphModule, targets: dict) -> dict:
    """The cones of ``found`` whose copy (``targets``, from ``inline``) the passes on ``body`` made dead."""
    alive = set(body.graph.nodes)
    return {position: cone for position, cone in found.items() if targets.get(position) not in alive}


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
