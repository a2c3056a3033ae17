"""The rewrite half of ``passes/tp_linears.py``: proven tensor-parallel chains become local linears and our
collectives (``ops/tp_collectives.py``).

Where the new nodes go, and what they may share:

- a parameter's local shard (``W.to_local()``) is read once per grad-mode region, at the region's start
  (after the graph's inputs, or after the switch that opens it), so each region's computation stays one part
  on plain tensors and a shard read under ``no_grad`` never serves an ``enable_grad`` block; its node is named
  by ``shard_name`` (the FP8 pass recognises shards by it);
- column-parallel linears that read one input share its ``kp::tp_copy`` unless a node between them may write
  in place (a ``_`` method, ``inplace=True``, ``out=``, ``setitem``, an in-place ``operator``, a mutable schema,
  a module call) or switches grad mode; the later reader then gets a copy of its own;
- a row-parallel bias is added in the output's dtype (``DTensor`` adds it inside the GEMM, so under autocast
  the output stays bf16); reduce-scattered over tokens, it goes through ``kp::tp_copy`` first: each rank then
  holds its tokens only, and the bias's gradient must be summed over the group;
- every node is read from the graph as it stands when its chain is rewritten: a chain's input may be the
  output of a chain rewritten before it (``fc2(fc1(x))``).

Before / after: ``passes/tp_linears.py``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from ..core.graph import erase_dead, is_mutating
from ..core.plain_regions import example_value
from ..ops import tp_collectives  # noqa: F401  (registers the kp::tp_* and kp::sp_* ops)

LOCAL_SUFFIX = "_tp_local"  # a local shard's node: the parameter's name and this (fp8-linear's module paths)
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul}


@dataclass
class Localized:
    """What ``localize`` did: the graph (a copy; the input is untouched; None where no chain was proven) and the
    chains per kind."""
    gm: Optional[fx.GraphModule]
    colwise: int = 0
    rowwise: int = 0
    copies: int = 0  # kp::tp_copy nodes for inputs (column-parallel linears reading one input count once)
    scatters: int = 0  # row-parallel outputs reduce-scattered over tokens (sequence parallelism)
    kept: list = field(default_factory=list)  # "linear_3: why" for DTensor linears left as captured


def switches_grad_mode(node: fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return node.op == "call_function" and ("grad_enabled" in name or "inference_mode" in name)


def may_write(node: fx.Node) -> bool:
    """Whether ``node`` may write a tensor in place (a Dynamo graph's torch-level spellings)."""
    if node.op == "call_module":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    name = str(getattr(node.target, "__name__", node.target))
    if node.kwargs.get("inplace") is True or "out" in node.kwargs or node.target in _IN_PLACE_OPERATORS:
        return True
    return (name.endswith("_") and not name.endswith("__")) or is_mutating(node)


def _regions(graph: fx.Graph) -> tuple[dict, list]:
    """``({node: region}, [the node each region starts after])``: regions are counted by grad-mode switches; the
    first starts after the graph's last input."""
    starts = [list(graph.find_nodes(op="placeholder"))[-1]]
    out = {}
    for node in graph.nodes:
        if switches_grad_mode(node):
            starts.append(node)
        out[node] = len(starts) - 1
    return out, starts


def shard_name(param: str, region: int) -> str:
    """The name of ``param``'s local shard read in grad-mode ``region``."""
    return f"{param}{LOCAL_SUFFIX}" + (f"_r{region}" if region else "")


def shard_param(name: str) -> Optional[str]:
    """The parameter's node name where ``name`` is a shard's (``shard_name``), else None."""
    found = re.fullmatch(rf"(.*){LOCAL_SUFFIX}(?:_r\d+)?", name)
    return found.group(1) if found else None


def is_parameter(node: fx.Node, example) -> bool:
    """Whether placeholder ``node`` (``example`` its example value) holds a parameter: an ``nn.Parameter``, or a
    tensor-parallel parameter's local shard (``shard_name``), which passes take as the parameter it is of."""
    return node.op == "placeholder" and (shard_param(node.name) is not None or isinstance(example, torch.nn.Parameter))


def _shareable(first: fx.Node, later: fx.Node) -> bool:
    node = first.next
    while node is not later and node.op != "output":
        if may_write(node) or switches_grad_mode(node):
            return False
        node = node.next
    return True


def rewrite(graph: fx.Graph, chains: list) -> tuple[int, int, int, int]:
    """Rewrite ``chains`` (``tp_linears._chain``'s, in graph order); ``(colwise, rowwise, copies, scatters)``."""
    regions, starts = _regions(graph)
    shards: dict = {}

    def shard(param: Optional[fx.Node], link: fx.Node) -> Optional[fx.Node]:
        if param is None:
            return None
        key = (param, regions[link])
        if key not in shards:  # at the region's start: its computation stays one part on plain tensors
            with graph.inserting_after(starts[key[1]]):
                node = graph.create_node("call_method", "to_local", (param,), name=shard_name(param.name, key[1]))
            if node.name != shard_name(param.name, key[1]):  # FX renamed it: the FP8 pass would not know it
                raise ValueError(f"the name {shard_name(param.name, key[1])!r} is taken in the graph")
            node.meta["example_value"] = example_value(param)._local_tensor
            shards[key] = node
        return shards[key]

    counts = {"colwise": 0, "rowwise": 0, "copies": 0, "scatters": 0}
    copies: dict = {}  # (x, group) -> the tp_copy that column-parallel linears reading x share
    gathered: dict = {}  # redistribute node -> the kp::sp_all_gather its column-parallel readers share
    for chain in chains:
        end, link, mesh = chain["out"], chain["nodes"][2], chain["mesh"]
        group = mesh.get_group().group_name
        w, b, local = shard(chain["w"], link), shard(chain["b"], link), example_value(end)
        counts[chain["kind"]] += 1
        if chain["kind"] == "colwise":
            if "gather" in chain:
                x = gathered.get(chain["source"])
                if x is None:
                    x = gathered[chain["source"]] = _gather(graph, chain["source"], chain["gather"][1], mesh)
            else:
                source = chain["nodes"][3]
                key = (source.args[0], group)  # read now: an earlier chain may have replaced it
                if key not in copies or not _shareable(copies[key], source):
                    with graph.inserting_before(source):
                        copies[key] = _node(graph, torch.ops.kp.tp_copy.default, key, example_value(key[0]))
                    counts["copies"] += 1
                x = copies[key]
            with graph.inserting_before(end):
                if chain["gather_out"]:  # the columns gathered whole: every rank gets the full output
                    cols = _node(graph, torch._C._nn.linear, (x, w, b), example_value(link)._local_tensor,
                                 "linear_local")
                    new = _node(graph, torch.ops.kp.tp_all_gather.default, (cols, mesh.size(), group), local)
                else:
                    new = _node(graph, torch._C._nn.linear, (x, w, b), local, "linear_local")
        else:
            with graph.inserting_before(end):
                new = _row_parallel(graph, chain, w, b, group, mesh, local)
            counts["scatters"] += chain["scatter"] is not None
        end.replace_all_uses_with(new)
        erase_dead(chain["nodes"])
    erase_dead(list(gathered))  # every reader was rewritten (tp_linears._whole_gathers)
    return counts["colwise"], counts["rowwise"], counts["copies"], counts["scatters"]


def _row_parallel(graph: fx.Graph, chain: dict, w, b, group: str, mesh, local) -> fx.Node:
    h = chain["nodes"][3].args[0]
    partial = _node(graph, torch._C._nn.linear, (h, w), example_value(chain["nodes"][2])._local_tensor, "linear_local")
    if chain["scatter"] is None:
        out = _node(graph, torch.ops.kp.tp_reduce.default, (partial, group), local)
    else:
        out = _node(graph, torch.ops.kp.sp_reduce_scatter.default, (partial, chain["scatter"], mesh.size(), group),
                    local)
        if b is not None:  # this rank's tokens only: the bias's gradient is summed over the group
            b = _node(graph, torch.ops.kp.tp_copy.default, (b, group), example_value(b))
    if b is None:
        return out
    b = graph.create_node("call_method", "type_as", (b, out))
    b.meta["example_value"] = example_value(out)
    return _node(graph, operator.add, (out, b), local)


def _gather(graph: fx.Graph, source: fx.Node, dim: int, mesh) -> fx.Node:
    """``kp::sp_all_gather`` of the local shard of what ``source`` gathered as a DTensor."""
    src = source.args[0]
    with graph.inserting_before(source):
        piece = graph.create_node("call_method", "to_local", (src,))
        piece.meta["example_value"] = example_value(src)._local_tensor
        return _node(graph, torch.ops.kp.sp_all_gather.default, (piece, dim, mesh.size(), mesh.get_group().group_name),
                     example_value(source)._local_tensor)


def _node(graph: fx.Graph, target, args, value, name: Optional[str] = None) -> fx.Node:
    node = graph.create_node("call_function", target, args, name=name)
    node.meta["example_value"] = value
    return node
