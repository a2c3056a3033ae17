"""The passes inside activation-checkpointed regions.

``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` (what transformers'
``gradient_checkpointing_enable()`` and torchtitan's activation checkpointing call) reaches the backend as
``higher_order.tag_activation_checkpoint(body, *args)``, which ``regions.hide`` keeps whole so that its
recomputation survives canonicalization. The layer's attention, linears and experts are inside ``body``, so
without this step no pass sees them.

``rewrite(cgm, run)`` takes each checkpoint stand-in of the canonical graph, canonicalizes its body on the
stand-in's example values, and hands it to ``run`` (the backend runs the graph's own passes on it). The body
keeps its inputs and outputs: the higher-order op is restored around the rewritten body, and AOTAutograd
recomputes it in the backward as before, our ops included. Before (a body, torch IR)::

    %wrap_body_0 = get_attr[wrap_body_0]
    %tag_activation_checkpoint = higher_order.tag_activation_checkpoint(%wrap_body_0, %x, %w_qkv, ...)
        # wrap_body_0: ... %matmul = torch.matmul(%q, %transpose); ...; %softmax = ...; torch.matmul(%softmax, %v)

After (what the lowering gets)::

    %kp_region_0_0 = get_attr[kp_region_0_0]
    %tag_activation_checkpoint = higher_order.tag_activation_checkpoint(%kp_region_0_0, %x, %w_qkv, ...)
        # kp_region_0_0: ... %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, is_causal=True) ...

A body runs twice per step (forward, then the recompute), so a rewrite is kept only if it holds no state across
calls and relies on nothing outside the body. The body stays as captured when a rewrite there adds a runtime
guard or a hook, reads a new attribute (FP8 scale state, tables), or adds an op that writes its inputs; the
report says which. In a graph with DTensor inputs (a part of a tensor-parallel graph) a rewrite that adds a
random-seeded op (SDPA) is not kept either: AOTAutograd fails on it there (``SEEDED_UNDER_DTENSOR``). Body
inputs that are inputs of the whole graph keep that graph's example values and names
(what ``fp8-linear`` reads a parameter's module path from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx

from . import checkpoint_masks, regions
from .canonicalize import canonicalize
from .graph import val
from .pass_manager import PassError


def checkpoint_hop():
    """The higher-order op Dynamo captures ``torch.utils.checkpoint`` as (None on a torch without it)."""
    return getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


@dataclass
class Body:
    """One checkpoint body through the passes: what they did, and whether the rewrite was kept."""

    key: int
    records: list = field(default_factory=list)  # the PassRecords of the run on the body
    guards_added: list = field(default_factory=list)  # shape guards its passes added ({"step", "guard"})
    masks: int = 0  # inputs computed again inside the kept body (``checkpoint_masks.py``)
    kept: bool = False
    why: str = ""  # why the rewrite was not kept (empty when kept or when nothing matched)

    @property
    def matches(self) -> int:
        return sum(r.matches for r in self.records)

    @property
    def rewrites(self) -> int:
        """Matches of passes other than the clean-ups (``CLEANUPS``): what makes a body worth replacing."""
        return sum(r.matches for r in self.records if r.name not in CLEANUPS)


# Passes that only tidy a graph for the others (a no-op view, a same-dtype cast): a body where only these
# matched is left as captured, since the canonical body alone buys nothing and lowers differently.
CLEANUPS = frozenset({"noop-elimination"})


def stand_ins(cgm: fx.GraphModule) -> list:
    """``(node, region)`` for every hidden checkpoint of the canonical graph, in program order."""
    hop = checkpoint_hop()
    out = []
    for node in cgm.graph.nodes:
        if node.op == "call_function" and node.target is regions.REGION_OP:
            region = regions.lookup(node.args[2])
            if region is not None and hop is not None and region.hop is hop:
                out.append((node, region))
    return out


def _inputs(node: fx.Node, region, real_of: dict, fake_of: dict) -> tuple:
    """The body's example values (fake), real values (for those that are inputs of the graph, else None) and
    the graph node behind each argument (None for a constant). A graph input keeps the fake tensor Dynamo made
    for it (a float passed as a 0-d tensor keeps the value ``item()`` reads), not the node's copy."""
    tensors, ints, _ = node.args
    order = regions._values(list(tensors), list(ints), region.order)
    nodes = region.call_args(order)
    fakes = [(fake_of[a] if a in fake_of else val(a)) if isinstance(a, fx.Node) else a for a in nodes]
    reals = [real_of.get(a) if isinstance(a, fx.Node) else a for a in nodes]
    return fakes, reals, [a if isinstance(a, fx.Node) else None for a in nodes]


def _name_after_graph_inputs(body: fx.GraphModule, outer: list) -> None:
    """Body placeholders that are the graph's inputs get that input's name (a parameter's module path)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    taken = {n.name for n in body.graph.nodes}
    for p, o in zip(placeholders, outer):
        if o is None or o.op != "placeholder" or o.name == p.name or o.name in taken or not hasattr(p, "_rename"):
            continue
        taken.discard(p.name)
        p._rename(o.name)
        p.target = p.name
        taken.add(p.name)
    body.recompile()


def _mutable_targets(gm: fx.GraphModule) -> set:
    out = set()
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if n.op == "call_method" and str(n.target).endswith("_") or schema is not None and schema.is_mutable:
            out.add(n.target)
    return out


def _attributes(gm: fx.GraphModule) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def _seeded_targets(gm: fx.GraphModule) -> set:
    tag = torch.Tag.nondeterministic_seeded
    return {n.target for n in gm.graph.nodes if n.op == "call_function" and tag in getattr(n.target, "tags", ())}


SEEDED_UNDER_DTENSOR = ("a rewrite there adds {ops} (a random-seeded op, whose RNG state a checkpoint saves for "
                        "the recompute) to a graph with DTensor inputs: torch 2.13's AOTAutograd then saves a "
                        "non-tensor for the backward and fails at the first step (plain Inductor fails the same "
                        "way where the model calls SDPA itself; torch 2.9 does not; other versions unchecked)")


def new_constants(before: fx.GraphModule, after: fx.GraphModule) -> list[str]:
    """The tensor attributes a rewrite added to a body (flex attention's block masks): constants made at compile
    time, which ``lift`` passes in from the graph around the body."""
    new = _attributes(after) - _attributes(before)
    return sorted(name for name in new if isinstance(getattr(after, name, None), torch.Tensor))


def unsafe(before: fx.GraphModule, after: fx.GraphModule, guards: list, hooks: list,
           seeded: bool = True, constants: bool = False) -> Optional[str]:
    """Why a rewritten body may not be run twice per step as it stands (None when it may). ``seeded=False``:
    the graph has DTensor inputs, where a new random-seeded op (SDPA) in a checkpoint breaks AOTAutograd.
    New attributes that are graphs (a higher-order op's functions) are pure; new tensor attributes are allowed
    only with ``constants`` (then ``lift`` passes them in), and only if no op writes them."""
    if guards:
        return "a rewrite there relies on runtime guards over the body's inputs"
    if hooks:
        return "a rewrite there keeps state about the body's inputs (a hook before every call)"
    new = _attributes(after) - _attributes(before)
    new = {n for n in new if not isinstance(getattr(after, n, None), fx.GraphModule)}
    writes = _mutable_targets(after) - _mutable_targets(before)
    if new and (writes or not (constants and set(new_constants(before, after)) == new)):
        return f"a rewrite there reads new attributes ({', '.join(sorted(new))}): state the recompute would share"
    if writes:
        return f"a rewrite there writes its inputs ({', '.join(sorted(map(str, writes)))})"
    added = _seeded_targets(after) - _seeded_targets(before)
    if not seeded and added:
        return SEEDED_UNDER_DTENSOR.format(ops=", ".join(sorted(map(str, added))))
    return None


def rewrite(cgm: fx.GraphModule, run: Callable[[fx.GraphModule, list, list], Any], real_inputs: list,
            fake_inputs: list, seeded: bool = True) -> list[Body]:
    """Run ``run(body, fake_inputs, real_inputs)`` (a ``PassManager`` that has run, or raises) on every
    checkpoint body of ``cgm`` and keep each rewrite that is safe to recompute. ``real_inputs`` and
    ``fake_inputs``: the graph's example values and their fakes, in placeholder order; ``seeded`` as in
    ``unsafe``. Returns one ``Body`` per checkpoint."""
    placeholders = [n for n in cgm.graph.nodes if n.op == "placeholder"]
    real_of, fake_of = dict(zip(placeholders, real_inputs)), dict(zip(placeholders, fake_inputs))
    out = []
    for node, region in stand_ins(cgm):
        body = Body(node.args[2])
        out.append(body)
        fakes, reals, outer = _inputs(node, region, real_of, fake_of)
        found = checkpoint_masks.cones(node, region)
        tries = [found, {}] if found else [{}]  # first with the masks computed inside, if any
        while tries:
            masks = tries.pop(0)
            try:
                canonical, _, body_fakes = canonicalize(region.bodies[0], fakes)
            except Exception as e:  # noqa: BLE001 - the body stays as captured, which is correct
                body.why = f"canonicalization of the body failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                break
            try:
                _name_after_graph_inputs(canonical, outer)
                copied, leaves, targets = checkpoint_masks.inline(canonical, masks) if masks else (set(), [], {})
                body_fakes = [*body_fakes, *(val(leaf) for leaf in leaves)]
                body_reals = [*reals, *(real_of.get(leaf) for leaf in leaves)]
                before = fx.GraphModule(canonical, _copy(canonical.graph))
                manager = run(canonical, body_fakes, body_reals)
                body.records = list(manager.record.passes)
                body.guards_added = list(manager.record.guards_added)
                checkpoint_masks.sweep(canonical, copied)
                if masks and (not body.rewrites or set(canonical.graph.nodes) & copied):
                    fewer = checkpoint_masks.dead(masks, canonical, targets) if body.rewrites else {}
                    if fewer and len(fewer) < len(masks):
                        tries.insert(0, fewer)  # again with only the masks the passes made dead
                    continue  # some copied masks are still computed: try with fewer, then as it came
                if not body.rewrites:
                    break
                body.why = unsafe(before, canonical, manager.guards, manager.hooks, seeded, constants=seeded) or ""
                if not body.why:
                    lift(cgm, node, region, canonical, new_constants(before, canonical))
                    checkpoint_masks.pass_leaves(node, region, leaves)
                    regions.restore(canonical)  # regions nested in the body (an autograd.Function in a checkpoint)
            except PassError:  # strict=True: a pass failed, as it would outside a body
                raise
            except Exception as e:  # noqa: BLE001 - the body stays as captured, which is correct
                body.why = f"the passes on the body failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                break
            if not body.why:
                region.bodies = (canonical,)
                body.kept = True
                body.masks = len(masks)
            break
    return out


def lift(cgm: fx.GraphModule, node: fx.Node, region, body: fx.GraphModule, names: list) -> None:
    """Pass the body's new constant tensors (``new_constants``) in as arguments: each becomes a buffer of ``cgm``
    (with a constant source where Dynamo's graph maps its buffers, so AOTAutograd lifts it as a static input, as
    it does a top-level block mask) read by ``get_attr`` before the checkpoint, and a placeholder of the body."""
    if not names:
        return
    tensors, ints, key = node.args
    tensors, order, args = list(tensors), list(region.order), list(region.args)
    last = list(body.graph.find_nodes(op="placeholder"))[-1]
    for name in names:
        value = getattr(body, name)
        outer_name = regions._free_name(cgm, f"{name}_r{key}")
        cgm.register_buffer(outer_name, value)
        if hasattr(cgm, "_param_name_to_source"):
            from torch._dynamo.source import ConstantSource
            cgm._param_name_to_source = {**cgm._param_name_to_source, outer_name: ConstantSource(outer_name)}
        with cgm.graph.inserting_before(node):
            read = cgm.graph.get_attr(outer_name)
        read.meta["val"] = val(next(iter(body.graph.find_nodes(op="get_attr", target=name))))
        tensors.append(read)
        order.append(("t", len(tensors) - 1))
        args.append((regions._SLOT, len(order) - 1))
        with body.graph.inserting_after(last):
            last = body.graph.placeholder(name + "_in")
        for attr in list(body.graph.find_nodes(op="get_attr", target=name)):
            last.meta.update(attr.meta)
            attr.replace_all_uses_with(last)
            body.graph.erase_node(attr)
        delattr(body, name)
    node.args = (tensors, ints, key)
    region.order, region.args = tuple(order), tuple(args)
    body.recompile()


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def merge(record, bodies: list[Body]) -> None:
    """List every body in ``record.checkpoints`` (with why a rewrite was not kept) and add what the passes did
    in the kept ones to ``record``'s pass entries."""
    for body in bodies:
        record.checkpoints.append({"region": body.key, "rewrites": body.matches, "kept": body.kept, "why": body.why,
                                   "masks_inside": body.masks})
        record.guards_added += body.guards_added
        if not body.kept:
            continue
        for sub in body.records:
            if not sub.matches and not sub.notes:
                continue
            main = next((r for r in reversed(record.passes) if r.name == sub.name), None)
            if main is None:
                record.passes.append(sub)
                continue
            main.matches += sub.matches
            for rule, n in sub.by_rule.items():
                main.by_rule[rule] = main.by_rule.get(rule, 0) + n
            main.notes += [n for n in sub.notes if n not in main.notes]
            if sub.matches:
                main.notes.append(f"{sub.matches} of them inside activation-checkpointed region {body.key}")
