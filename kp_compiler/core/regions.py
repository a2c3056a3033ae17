"""Autograd regions: higher-order ops that carry their own backward, kept whole through the pipeline.

Dynamo captures a custom ``torch.autograd.Function`` as
``higher_order.autograd_function_apply(fwd_body, bwd_body, *args)`` and
``torch.utils.checkpoint`` as ``higher_order.tag_activation_checkpoint(body,
*args)``. Pre-dispatch ``make_fx`` cannot keep either: it inlines the
forward body under ``no_grad`` (the custom backward is lost, and with it the
gradient of everything before the region) or fails outright (checkpoint).

So canonicalization hides each such node behind one opaque op for the
trace, ``kp::autograd_region(tensors, ints, key)``; passes see a call they
do not understand and leave it alone; before lowering ``restore`` puts the
original higher-order op back, with its bodies, for AOTAutograd to
differentiate as it would a Dynamo graph.

Before ``hide`` (Dynamo graph)::

    %fwd_body_0 = get_attr[fwd_body_0]() : none
    %bwd_body_0 = get_attr[bwd_body_0]() : none
    %afa = torch.ops.higher_order.autograd_function_apply(%fwd_body_0, %bwd_body_0, %arg, ...) : (f32[4, 8])
    %getitem = _operator.getitem(%afa, 0) : f32[4, 8]

Canonical graph, as passes see it::

    %autograd_region = kp.autograd_region.default([%linear], [], 0) : (f32[4, 8])
    %getitem = _operator.getitem(%autograd_region, 0) : f32[4, 8]

After ``restore`` (what the lowering gets)::

    %kp_region_0_0 = get_attr[kp_region_0_0]() : none
    %kp_region_0_1 = get_attr[kp_region_0_1]() : none
    %autograd_function_apply = torch.ops.higher_order.autograd_function_apply(%kp_region_0_0, %kp_region_0_1, %linear, ...)
    %getitem = _operator.getitem(%autograd_function_apply, 0) : f32[4, 8]

Passes therefore do not rewrite inside a region (correct before coverage);
``explain`` and the report count the regions kept.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import fx

_keys = itertools.count()
_REGIONS: dict[int, "Region"] = {}


def _hops() -> dict:
    """The higher-order ops kept whole, each with the function that runs its forward values."""
    hop = torch.ops.higher_order
    out = {}
    if hasattr(hop, "autograd_function_apply"):
        out[hop.autograd_function_apply] = _function_forward
    if hasattr(hop, "tag_activation_checkpoint"):
        out[hop.tag_activation_checkpoint] = lambda bodies, args: bodies[0](*args)
    return out


def _function_forward(bodies: tuple, args: tuple):
    """An ``autograd.Function``'s forward outputs; torch before 2.10 passes a ``ctx`` slot (None) first."""
    fwd = bodies[0]
    takes = sum(1 for n in fwd.graph.nodes if n.op == "placeholder")
    return (fwd(None, *args) if takes == len(args) + 1 else fwd(*args))[0]


@dataclass
class Region:
    """One hidden higher-order call: enough to run its forward and to put it back."""

    hop: Any
    bodies: tuple  # the GraphModules it takes first (forward and backward bodies, or one body)
    args: tuple  # the remaining positional args; ("arg", i) marks the i-th graph value
    kwargs: dict
    forward: Callable  # (bodies, args) -> outputs
    single: bool  # the op returns one tensor, not a tuple
    order: tuple  # the graph values in call order: ("t", j) is tensors[j], ("i", j) is ints[j]

    def call_args(self, values: list) -> tuple:
        return tuple(values[a[1]] if _is_slot(a) else a for a in self.args)

    def outputs(self, values: list) -> list:
        out = self.forward(self.bodies, self.call_args(values))
        return [out] if self.single else list(out)


def _is_slot(a: Any) -> bool:
    return isinstance(a, tuple) and len(a) == 2 and a[0] == _SLOT


_SLOT = "kp_region_value"


def _values(tensors: list, ints: list, order: tuple) -> list:
    return [tensors[j] if kind == "t" else ints[j] for kind, j in order]


@torch.library.custom_op("kp::autograd_region", mutates_args=())
def autograd_region(tensors: list[torch.Tensor], ints: list[int], key: int) -> list[torch.Tensor]:
    """Runs a hidden region's forward without autograd (``verify`` and shape propagation only)."""
    region = _REGIONS[key]
    with torch.no_grad():
        outs = region.outputs(_values(tensors, ints, region.order))
    return [o.clone() for o in outs]


@autograd_region.register_fake
def _(tensors, ints, key):
    region = _REGIONS[key]
    return [o.clone() for o in region.outputs(_values(tensors, ints, region.order))]


REGION_OP = torch.ops.kp.autograd_region.default


def present(gm: fx.GraphModule) -> bool:
    """``gm`` calls a higher-order op that ``hide`` keeps whole."""
    hops = _hops()
    return any(n.op == "call_function" and n.target in hops for n in gm.graph.nodes)


def hide(gm: fx.GraphModule) -> list[int]:
    """Replace every autograd-carrying higher-order call in ``gm`` (in place) by ``kp::autograd_region``.

    Returns the regions' keys; ``release_with(graph_module, keys)`` ties their
    lifetime to the graph that carries the stand-ins (the canonical graph),
    not to ``gm``. Raises ``ValueError`` for a call
    whose outputs are not one tensor or a flat tuple of tensors, or whose
    inputs are not tensors and ints: canonicalization then fails and the
    backend lowers the Dynamo graph unchanged, which stays correct.
    """
    hops = _hops()
    keys = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in hops:
            continue
        keys.append(_hide_one(gm, node, hops[node.target]))
    if keys:
        gm.recompile()
    return keys


def release_with(owner: Any, keys: list) -> None:
    """Forget the regions ``keys`` once ``owner`` (the graph module whose nodes name them) is collected."""
    for key in keys:
        weakref.finalize(owner, _REGIONS.pop, key, None)


def _hide_one(gm: fx.GraphModule, node: fx.Node, forward: Callable) -> int:
    n_bodies = 2 if node.target is getattr(torch.ops.higher_order, "autograd_function_apply", None) else 1
    bodies = tuple(getattr(gm, b.target) for b in node.args[:n_bodies])
    example = node.meta.get("example_value")
    single = isinstance(example, torch.Tensor)
    leaves = [example] if single else list(example) if isinstance(example, (tuple, list)) else None
    if leaves is None or not all(isinstance(x, torch.Tensor) for x in leaves):
        raise ValueError(f"{node.name}: {node.target} returns {type(example).__name__}, not tensors")
    tensors, ints, order, args = [], [], [], []
    for a in node.args[n_bodies:]:
        if not isinstance(a, fx.Node):
            if any(isinstance(x, fx.Node) for x in pytree.tree_leaves(a)):
                raise ValueError(f"{node.name}: nested graph values in argument {a!r} of {node.target}")
            args.append(a)
            continue
        v = a.meta.get("example_value")
        if isinstance(v, torch.Tensor):
            order.append(("t", len(tensors)))
            tensors.append(a)
        elif isinstance(v, (int, torch.SymInt)):
            order.append(("i", len(ints)))
            ints.append(a)
        else:
            raise ValueError(f"{node.name}: argument {a.name} of {node.target} is {type(v).__name__}")
        args.append((_SLOT, len(order) - 1))
    key = next(_keys)
    region = Region(node.target, bodies, tuple(args), dict(node.kwargs), forward, single, tuple(order))
    _REGIONS[key] = region
    with gm.graph.inserting_before(node):
        stand_in = gm.graph.call_function(REGION_OP, (tensors, ints, key))
        stand_in.meta.update(node.meta)
        if single:
            out = gm.graph.call_function(operator.getitem, (stand_in, 0))
            out.meta["example_value"] = example
        else:
            out = stand_in
    node.replace_all_uses_with(out)
    body_nodes = node.args[:n_bodies]
    gm.graph.erase_node(node)
    for body in body_nodes:  # only the bodies' get_attr nodes: FX's dead-code pass would also drop a
        if not body.users:  # torch-IR graph's in-place method calls (``buf.copy_(x)``), whose results go unread
            gm.graph.erase_node(body)
    return key


def count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is REGION_OP)


def restore(gm: fx.GraphModule) -> int:
    """Put every ``kp::autograd_region`` of ``gm`` back as its higher-order op (in place); returns how many."""
    restored = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not REGION_OP:
            continue
        _restore_one(gm, node)
        restored += 1
    if restored:
        gm.graph.lint()
        gm.recompile()
    return restored


def _restore_one(gm: fx.GraphModule, node: fx.Node) -> None:
    tensors, ints, key = node.args
    region = _REGIONS[key]
    values = _values(list(tensors), list(ints), region.order)
    with gm.graph.inserting_before(node):
        bodies = []
        for i, body in enumerate(region.bodies):
            name = _free_name(gm, f"kp_region_{key}_{i}")
            gm.add_submodule(name, body)
            bodies.append(gm.graph.get_attr(name))
        hop = gm.graph.call_function(region.hop, (*bodies, *region.call_args(values)), dict(region.kwargs))
    outs = node.meta.get("val")
    if region.single:
        for user in list(node.users):
            if not _is_first_item(user):
                raise ValueError(f"{node.name}: a single-output region is read by {user.format_node()}")
            hop.meta["val"] = user.meta.get("val")
            user.replace_all_uses_with(hop)
            gm.graph.erase_node(user)
    else:
        hop.meta["val"] = tuple(outs) if outs is not None else None
        node.replace_all_uses_with(hop)
    gm.graph.erase_node(node)


def _is_first_item(user: fx.Node) -> bool:
    return user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, n = base, 0
    while hasattr(gm, name):
        n += 1
        name = f"{base}_{n}"
    return name


def lookup(key: int) -> Optional[Region]:
    return _REGIONS.get(key)
