"""Tensor-parallel graphs: the parts that compute on plain tensors, cut out for the passes (issue 21).

Under tensor parallelism (``parallelize_module``) Dynamo captures graphs whose parameters are ``DTensor``s:
each sharded linear runs as ``DTensor.from_local`` -> ``linear`` -> ``redistribute`` -> ``to_local``. Between
those, the model computes on plain local tensors: the attention over this rank's heads, the activation of its
MLP columns. Canonicalization cannot trace a DTensor, so ``split`` cuts the graph into parts, each a
submodule the parent graph calls: DTensor parts (every node that takes or makes a DTensor) and plain parts.
The backend runs the passes on each plain part as on any graph (its inputs are the part's example values)
and keeps the DTensor parts as Dynamo captured them; Inductor lowers the parent, tracing into the parts.
Before the cut, ``passes/tp_linears.py`` computes the column- and row-parallel linears on their local shards
where it can prove them, so a model under the usual plan is then one DTensor part (the shards read from the
parameters) and one plain part; what follows is the cut of a graph where it could not.

Parts are runs of consecutive nodes of one kind, in the graph's own order: every part runs where its nodes
ran, so in-place writes (a buffer updated in ``forward``) and grad-mode or autocast switches keep their
place, and ``split_module`` sees partition numbers that only grow. The attention of a block under TP is one
such run: between the ``to_local`` of ``v`` and the ``from_local`` before the output projection, the mask it
builds from its buffer included.

Before (one block under TP, rank 0 of 2; ``DT``: a DTensor value)::

    %linear = linear(%from_local, %q_weight, %q_bias) : DT      %hook_result = to_local(%outputs)
    %view = view(%hook_result, 2, 16, -1)                      ... %softmax ... %matmul_1 ... %reshape
    %input_tensor_5 = DTensor.from_local(%reshape, %mesh, (Shard(dim=-1),)) : DT

After ``split`` (the q, k and v linears are DTensor parts, their reshapes plain parts between them)::

    %submod_5 = call_module[submod_5](%getitem_4, %getitem_6, %getitem_8, %l_..._attn_buffers_bias_)
    %submod_6 = call_module[submod_6](%submod_5, %mesh, %l_..._proj_parameters_weight_, ...)  # DTensor part

and the backend replaces the plain ``submod_5`` (the attention) by its rewritten canonical graph, with SDPA.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_leaves


def dtensor_type():
    """torch's ``DTensor`` class, or None where torch has no ``torch.distributed.tensor``."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def has_dtensor(values) -> bool:
    """Whether any of ``values`` (nested lists and tuples) is a ``DTensor``."""
    dt = dtensor_type()
    return dt is not None and any(isinstance(v, dt) for v in tree_leaves(list(values)))


def example_value(node: Any) -> Any:
    """The example value Dynamo recorded for ``node`` (``val`` where none), or None for a constant."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _is_dtensor_node(node: fx.Node) -> bool:
    if has_dtensor([example_value(node)]):
        return True
    return any(has_dtensor([example_value(a)]) for a in node.all_input_nodes)


def runs(gm: fx.GraphModule, is_dtensor=None) -> dict[fx.Node, tuple[int, bool]]:
    """``{node: (run, is_dtensor)}`` for every computing node (not placeholders, attributes or the output): the
    run number grows by one wherever the kind changes from the node before."""
    out: dict = {}
    run, last = 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        dt = (is_dtensor or _is_dtensor_node)(node)
        if last is not None and dt != last:
            run += 1
        out[node], last = (run, dt), dt
    return out


def split(gm: fx.GraphModule, is_dtensor=None) -> Optional[tuple[fx.GraphModule, list[str]]]:
    """``(parent, names of its plain parts)``; None where the graph has no DTensor node or no plain part.
    ``is_dtensor(node)``: which nodes go to DTensor parts (default: those that take or make a DTensor)."""
    parts = runs(gm, is_dtensor)
    kinds = {dt for _, dt in parts.values()}
    if kinds != {True, False}:
        return None
    parent = split_module(gm, gm, lambda node: parts[node][0], keep_original_order=True)
    plain = sorted({run for run, dt in parts.values() if not dt})
    return parent, [f"submod_{run}" for run in plain if hasattr(parent, f"submod_{run}")]


def part_inputs(parent: fx.GraphModule, name: str, original: fx.GraphModule, example_inputs,
                fake_mode=None) -> Optional[list]:
    """The values a part is called with: the graph's own example input where the part reads a graph input (a
    registered buffer's real value, say), else the example value Dynamo recorded for the node of the same name,
    made again in ``fake_mode`` where given (Dynamo records them in a mode of its own, and torch 2.9 refuses
    inputs of two modes); None where one is unknown."""
    nodes = {n.name: n for n in original.graph.nodes}
    given = {ph.name: x for ph, x in zip(original.graph.find_nodes(op="placeholder"), example_inputs)}
    values = []
    for ph in getattr(parent, name).graph.find_nodes(op="placeholder"):
        value = given[ph.name] if ph.name in given else example_value(nodes[ph.name]) if ph.name in nodes else None
        if value is None:
            return None
        if fake_mode is not None and isinstance(value, FakeTensor) and value.fake_mode is not fake_mode:
            value = fake_mode.from_tensor(value)
        values.append(value)
    return values


def graph_input_index(original: fx.GraphModule) -> dict[str, int]:
    """``{placeholder name: position}`` of the graph's inputs (to map a part's input back to the graph's)."""
    return {ph.name: i for i, ph in enumerate(original.graph.find_nodes(op="placeholder"))}
