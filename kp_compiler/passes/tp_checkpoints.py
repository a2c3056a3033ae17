"""Tensor-parallel linears inside activation-checkpointed blocks (part of ``passes/tp_linears.py``).

With each block checkpointed (torchtitan's activation checkpointing, transformers' gradient checkpointing),
Dynamo puts the block's DTensor chains inside ``tag_activation_checkpoint(body, ...)``, whose inputs are the
block's DTensor parameters and the device mesh. ``localize_bodies`` runs ``localize`` on each body, then
reads the shards of the parameters the body now uses only locally in the graph around it (at the grad-mode
region's start, named by ``shard_name`` as any other shard) and hands the body those instead; inputs the body
no longer reads (the mesh) are dropped. A body whose every input is then a plain tensor makes the checkpoint a
plain node: its part goes through the pipeline, and ``core/checkpoint_bodies.py`` runs the passes inside.

Before (the graph; the body holds the chains of ``tp_linears``' docstring)::

    %tag_activation_checkpoint = higher_order.tag_activation_checkpoint(%wrap_body_0, %x, %mesh, %q_weight, ...)

After::

    %q_weight_tp_local = %q_weight.to_local()           # after the graph's inputs, as any shard
    %tag_activation_checkpoint = higher_order.tag_activation_checkpoint(%wrap_body_0, %x, %q_weight_tp_local, ...)
        # wrap_body_0: local linears with kp::tp_copy / kp::tp_reduce, as at the top level

The recompute runs the body's collectives again, as it runs DTensor's.
"""

from __future__ import annotations

from typing import Callable

from torch import fx

from ..core.checkpoint_bodies import checkpoint_hop
from ..core.graph import drop_input, erase_dead
from ..core.plain_regions import dtensor_type, example_value
from .tp_rewrite import Localized, _regions, shard_name


def checkpoints(graph: fx.Graph) -> list:
    hop = checkpoint_hop()
    return [n for n in graph.nodes if hop is not None and n.op == "call_function" and n.target is hop]


def localize_bodies(gm: fx.GraphModule, given: dict, result: Localized, localize: Callable) -> bool:
    """Localize the chains inside every checkpoint body of ``gm`` (its graph edited in place, each rewritten body
    set on ``gm`` under its own name); counts and reasons go to ``result``. ``given``: the graph's example
    inputs by placeholder name. True if any body changed."""
    graph = gm.graph
    changed = False
    for node in checkpoints(graph):
        body_node = node.args[0]
        body = getattr(gm, body_node.target)
        args = list(node.args[1:])
        values = [given.get(a.name, example_value(a)) if isinstance(a, fx.Node) else a for a in args]
        sub = localize(body, values)
        result.kept += [f"{body_node.target}.{why}" for why in sub.kept]
        if sub.gm is None:
            continue
        for kind in ("colwise", "rowwise", "copies", "scatters"):
            setattr(result, kind, getattr(result, kind) + getattr(sub, kind))
        args = _hoist_shards(graph, node, sub.gm, args)
        node.args = (body_node, *args)
        setattr(gm, body_node.target, sub.gm)
        changed = True
    return changed


def _hoist_shards(graph: fx.Graph, node: fx.Node, body: fx.GraphModule, args: list) -> list:
    """The checkpoint's new arguments: each body input read only as a shard is passed as that shard (read in
    the graph), and inputs the body no longer reads are dropped (with their placeholders)."""
    regions, starts = _regions(graph)
    region = regions[node]
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    keep = []
    for p, a in zip(placeholders, args):
        users = list(p.users)
        shard_reads = [u for u in users if u.op == "call_method" and u.target == "to_local" and len(u.args) == 1]
        if isinstance(a, fx.Node) and users and len(shard_reads) == len(users) \
                and isinstance(example_value(a), dtensor_type()):
            outer = _outer_shard(graph, a, region, starts)
            for u in shard_reads:
                u.replace_all_uses_with(p)
            erase_dead(shard_reads)
            p.meta["example_value"] = example_value(outer)
            keep.append((p, outer))
        elif users:
            keep.append((p, a))
        else:
            drop_input(p)
    body.graph.lint()
    body.recompile()
    return [a for _, a in keep]


def _outer_shard(graph: fx.Graph, param: fx.Node, region: int, starts: list) -> fx.Node:
    """``param``'s local shard in ``region`` of the graph, read at the region's start (one per region)."""
    name = shard_name(param.name, region)
    found = [n for n in graph.nodes if n.name == name]
    if found:
        return found[0]
    with graph.inserting_after(starts[region]):
        node = graph.create_node("call_method", "to_local", (param,), name=name)
    if node.name != name:
        raise ValueError(f"the name {name!r} is taken in the graph")
    node.meta["example_value"] = example_value(param)._local_tensor
    return node
