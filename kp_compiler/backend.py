"""The Dynamo backend: ``torch.compile(model, backend="kernelpytorch")``.

Registered through the ``torch_dynamo_backends`` entry point, so no import is
needed. Per graph Dynamo captures::

    Dynamo graph -> canonicalize (pre-dispatch ATen, fake mode)
                 -> passes (recorded, checked, rolled back on failure)
                 -> lowering (inductor | eager | xla)
                 -> CompiledGraph

It never turns a working eager model into an exception: if canonicalization
or the lowering of the rewritten graph fails, the Dynamo graph is lowered
unchanged and the report says why (``strict=True`` raises instead).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
import torch._dynamo
from torch import fx

from . import passes as _builtin_passes  # noqa: F401  (registers the built-in passes)
from .passes import tp_linears
from .core import checkpoint_bodies, plain_regions, regions
from .core.canonicalize import carry_dynamo_metadata, canonicalize, fake_mode_of, unregister_traced_constants
from .core.dump import GraphDump, append_report
from .core.pass_manager import (PassManager, anchored_passes, default_passes, idle_reason, not_applicable,
                                on_registry_change, resolve)
from .core.report import GraphRecord, new_record, publish
from .core.shape_guards import GuardWatch
from .lowering import input_devices, lower, select
from .core.devices import describe as describe_device
from .core.target import Target
from .lowering.moe import fused_available
from .lowering.xla import XlaUnavailable
from .options import Options, parse_options
from .core.rows import batch_symbol, prove_rows
from .ops.fp8_traced import TRACED_CASTS
from .runtime import CompiledGraph
from .runtime.graph_buckets import GraphBuckets, shared_recorder

log = logging.getLogger("kp_compiler")


def kernelpytorch(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> CompiledGraph:
    """Compile one Dynamo graph. See ``kp_compiler.options`` for ``options``."""
    opts = parse_options(mode, options)
    record = new_record()
    names = opts.passes if opts.passes is not None else _default_passes(gm, example_inputs, record)
    if opts.fp8 is not None and "fp8-linear" not in names:  # options["fp8"] asks for it by itself
        names = [*names, "fp8-linear"]
    chosen = resolve(names)
    record.mode = opts.mode
    record.lowering = select(opts.lowering, input_devices(example_inputs))
    dump = GraphDump.create(opts.dump_dir) if opts.dump_dir else None
    if dump is not None:
        record.dump = dump.folder
    start = time.perf_counter()
    try:
        fn, guards, fallback, hooks = _compile(gm, example_inputs, opts, chosen, record, dump)
    except Exception as e:
        if not _dynamo_control_flow(e):  # a restarted trace is not a compiled graph
            _finish(record, opts, start)
        raise
    _finish(record, opts, start)
    return CompiledGraph(fn, record, guards, fallback, hooks)


class _RenewedBackend:
    """``kernelpytorch`` under a new identity, after a pass was replaced or removed.

    Dynamo reuses a frame's compiled code when the backend compares equal,
    and ``torch.compile`` compares its backend function and options: with the
    same options a compile after ``register_pass(name, fn, replace=True)``
    would run the old pass. Dynamo's registry therefore gets a fresh object
    for the name ``"kernelpytorch"`` each time the pass registry changes; code
    compiled before keeps its old backend, later ``torch.compile`` calls get
    the new one and recompile. (A backend passed as the function object,
    ``backend=kp_compiler.kernelpytorch``, keeps its identity: reset Dynamo.)
    """

    def __init__(self, generation: int):
        self.generation = generation
        self.__name__ = "kernelpytorch"

    def __call__(self, gm, example_inputs, mode=None, options=None):
        return kernelpytorch(gm, example_inputs, mode=mode, options=options)

    def __repr__(self) -> str:
        return f"kernelpytorch(pass registry generation {self.generation})"


_generation = [0]


def _renew_identity() -> None:
    from torch._dynamo.backends import registry

    fns = getattr(registry, "_COMPILER_FNS", None)  # private: feature-detected, torch 2.9 to 2.13 have it
    if not isinstance(fns, dict):
        warnings.warn("kp_compiler: cannot renew the backend's identity in this torch: call torch._dynamo.reset() "
                      "after replacing a pass", RuntimeWarning, stacklevel=4)
        return
    _generation[0] += 1
    fns["kernelpytorch"] = _RenewedBackend(_generation[0])
    registry._BACKENDS.setdefault("kernelpytorch", None)


on_registry_change(_renew_identity)


def _compile(gm, example_inputs, opts: Options, chosen, record: GraphRecord, dump):
    if dump is not None:
        dump.write("dynamo", gm.graph, "dynamo graph (torch IR)", numbered=False)
    # With the default passes and nothing any of them could rewrite, the lowering gets the graph as Dynamo
    # captured it (no canonicalization cost). Passes named in options["passes"] always run.
    target = Target.of(example_inputs, record.lowering, gm)  # what every pass reads (context.current().target)
    # (buckets need the canonical graph to prove its rows apart: no shortcut then)
    idle = (idle_reason(gm, [name for name, _ in chosen], target, opts)
            if opts.passes is None and opts.cudagraph_buckets is None else None)
    # A pass that does not apply is reported where the Dynamo graph holds one of its anchors, else not at all.
    anchored = anchored_passes(gm, [name for name, _ in chosen])
    if idle is not None:
        why = f"nothing to rewrite ({idle}; options['passes'] runs it anyway)"
        for name, _ in chosen:
            na = not_applicable(name, target, opts)
            if na is None:
                record.skipped.append({"pass": name, "reason": why})
            elif name in anchored:
                record.skipped.append({"pass": name, "reason": f"not applicable on this target: {na}"})
        record.nodes_in = record.nodes_out = len(gm.graph.nodes)
        if not plain_regions.has_dtensor(example_inputs):
            return lower(record.lowering, gm, example_inputs, opts.mode, opts.inductor_config, dump), (), None, ()
        try:
            return lower(record.lowering, gm, example_inputs, opts.mode, opts.inductor_config, dump), (), None, ()
        except Exception as e:  # noqa: BLE001 - torch's own lowering of the DTensor graph failed: try ours
            if opts.strict or _dynamo_control_flow(e) or isinstance(e, XlaUnavailable):
                raise
            return _rescue_parts(gm, example_inputs, opts, chosen, record, target, e)
    if plain_regions.has_dtensor(example_inputs):
        return _compile_parts(gm, example_inputs, opts, chosen, record, target)
    watch = GuardWatch(fake_mode_of(example_inputs))
    mark = watch.mark()
    try:
        cgm, fake_mode, fake_inputs = canonicalize(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - fall back rather than break the model
        if opts.strict or _dynamo_control_flow(e):
            raise
        return _fallback(gm, example_inputs, opts, record, f"canonicalization failed ({_brief(e)})"), (), None, ()
    _note_guards(record, "canonicalize", watch.added_since(mark))
    record.nodes_in = len(cgm.graph.nodes)
    if dump is not None:
        dump.write("input", cgm.graph, "canonical input")
    manager = PassManager(
        chosen, record, fake_mode, fake_inputs, example_inputs,
        strict=opts.strict, verify=opts.verify, dump=dump, constant_buffers=opts.constant_buffers,
        pass_timeout_s=opts.pass_timeout_s, target=target, options=opts, anchored=anchored,
    )
    manager.run(cgm)
    _checkpointed(cgm, chosen, opts, target, fake_mode, dump, record, example_inputs, fake_inputs)
    record.nodes_out = len(cgm.graph.nodes)
    record.guards = [guard.to_json() for guard in manager.guards]
    # If a guarded input changes, the graph as it was before the first guarded pass runs op by op.
    fallback = fx.GraphModule(cgm, manager.unguarded) if manager.guards else None
    mark = watch.mark()
    try:
        # Custom autograd.Functions and checkpoints go back to their higher-order ops, which own their backward.
        record.autograd_regions = regions.restore(cgm)
        if fallback is not None:
            regions.restore(fallback)
        plan = _bucket_plan(cgm, example_inputs, opts, record, target)
        config = opts.inductor_config if plan is None else {**opts.inductor_config, "triton.cudagraphs": False}
        fn = lower(record.lowering, cgm, example_inputs, opts.mode, config, dump)
        if plan is not None:
            fn = GraphBuckets(fn, plan, opts.cudagraph_buckets, _recorder(_cuda_device(example_inputs)))
            record.buckets["runtime"] = fn.stats  # live: explain and report.json read the counts as they stand
        _note_guards(record, f"lowering ({record.lowering})", watch.added_since(mark))
    except XlaUnavailable:
        raise
    except Exception as e:  # noqa: BLE001
        if opts.strict or _dynamo_control_flow(e):
            raise
        why = f"lowering the rewritten graph failed ({_brief(e)})"
        return _fallback(gm, example_inputs, opts, record, why), (), None, ()
    return fn, manager.guards, fallback, manager.hooks


def _checkpointed(cgm, chosen, opts: Options, target, fake_mode, dump, record, real_inputs, fake_inputs,
                  seeded: bool = True) -> None:
    """The passes inside the activation-checkpointed regions of ``cgm`` (``core/checkpoint_bodies.py``);
    ``seeded=False`` in a part of a DTensor graph (``checkpoint_bodies.unsafe``)."""
    if checkpoint_bodies.stand_ins(cgm):
        run = _body_passes(chosen, opts, target, fake_mode, dump)
        checkpoint_bodies.merge(record, checkpoint_bodies.rewrite(cgm, run, real_inputs, fake_inputs, seeded))


def _body_passes(chosen, opts: Options, target, fake_mode, dump):
    """``run(body, fake_inputs, real_inputs)`` for ``checkpoint_bodies.rewrite``: the graph's passes on one
    checkpoint body, recorded apart (``checkpoint_bodies.merge`` adds them to the graph's record) and without
    ``verify`` (a body's inputs are values inside the graph, with no example values to run it on)."""
    def run(body: fx.GraphModule, fake_inputs: list, real_inputs: list) -> PassManager:
        manager = PassManager(chosen, GraphRecord(id=-1), fake_mode, fake_inputs, real_inputs, strict=opts.strict,
                              constant_buffers=opts.constant_buffers, pass_timeout_s=opts.pass_timeout_s,
                              target=target, options=opts)
        manager.run(body)
        if dump is not None:
            dump.write("checkpoint-body", body.graph, "an activation-checkpointed region's body after the passes")
        return manager
    return run


def _bucket_plan(cgm: fx.GraphModule, example_inputs, opts: Options, record: GraphRecord, target):
    """The row proof of ``cgm`` where ``options["cudagraph_buckets"]`` applies to it, else None; the record
    says which (``record.buckets``)."""
    if opts.cudagraph_buckets is None:
        return None
    why, symbol = None, None
    if opts.mode != "reduce-overhead":
        why = "buckets are captured with mode='reduce-overhead'"
    elif record.lowering != "inductor" or not _on_cuda(example_inputs):
        why = "CUDA graphs need CUDA inputs lowered through Inductor"
    elif target.training:
        why = "a training graph: parameter gradients sum over the batch"
    elif (symbol := batch_symbol(cgm)) is None:
        why = "no dynamic batch (dim 0 of an input): Inductor's CUDA graphs, one per size"
    if why is None:
        proof = prove_rows(cgm.graph, symbol)
        if proof.ok:
            record.buckets = {"sizes": list(opts.cudagraph_buckets)}
            return proof
        why = f"rows not proven independent along the batch: {proof.node}: {proof.reason}"
    record.buckets = {"why": why}
    return None


def _on_cuda(example_inputs) -> bool:
    return _cuda_device(example_inputs) is not None


def _cuda_device(example_inputs):
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.is_cuda), None)


def _recorder(device):
    """One pool and one warm-up stream for every bucketed graph of the device and thread."""
    return shared_recorder(device)


def _note_guards(record: GraphRecord, step: str, added: list) -> None:
    """Shape guards outside the passes (canonicalization, lowering) go to the report too."""
    record.guards_added += [{"step": step, "guard": text} for text in added]
    if added:
        log.info("graph %d: %s added shape guard(s) %s", record.id, step, added)


def _default_passes(gm: fx.GraphModule, example_inputs, record: GraphRecord) -> list:
    """``default_passes()``, less ``moe-dispatch`` where no fused kernel would run the op it emits.

    The op's reference loop is no faster than the loop Inductor compiles, so by
    default the rewrite happens only where it pays; listing the pass in
    ``options["passes"]`` runs it anywhere. The report says so only for a
    graph that routes tokens (a ``topk``), where the pass would have looked.
    """
    names = default_passes()
    if "moe-dispatch" not in names:
        return names
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    devices = {x.device for x in tensors} or {torch.device("cpu")}
    dtypes = {x.dtype for x in tensors if x.is_floating_point()}
    why = fused_available([describe_device(d) for d in devices], dtypes)
    if why is None:
        return names
    if _routes_tokens(gm):
        record.skipped.append({"pass": "moe-dispatch", "reason": why})
    return [n for n in names if n != "moe-dispatch"]


def _routes_tokens(gm: fx.GraphModule) -> bool:
    """The Dynamo graph takes a ``topk`` (router top-k): something ``moe-dispatch`` would look at."""
    return any(n.op in ("call_function", "call_method") and "topk" in str(getattr(n.target, "__name__", n.target))
               for n in gm.graph.nodes)


def _fallback(gm, example_inputs, opts: Options, record: GraphRecord, why: str):
    record.fallback(f"{why}; lowered the Dynamo graph unchanged with {record.lowering}")
    msg = f"kp_compiler: graph {record.id}: {record.fallbacks[-1]}"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return lower(record.lowering, gm, example_inputs, opts.mode, opts.inductor_config)


def _rescue_parts(gm, example_inputs, opts: Options, chosen, record: GraphRecord, target, error: Exception):
    """A tensor-parallel graph with nothing to rewrite whose lowering as captured failed (torch 2.13's
    AOTAutograd recurses without end on transformers' row-parallel DTensor linears under dynamic sizes; plain
    Inductor fails the same way): its sharded linears computed locally (``passes/tp_linears.py``) and the graph
    lowered in parts, as when a pass is listed. The record says why; if that fails too, the first error stands."""
    record.skipped.clear()
    note = f"lowering the DTensor graph as captured failed ({_brief(error)}); its sharded linears computed locally"
    try:
        out = _compile_parts(gm, example_inputs, opts, chosen, record, target)
    except Exception:  # noqa: BLE001 - the first error is the user's
        raise error from None
    local = (record.parts or {}).get("local_linears") or {}
    if not local.get("colwise", 0) + local.get("rowwise", 0):
        raise error  # nothing was localized: the graph that failed, less the report
    record.parts["rescued"] = note
    log.warning("kp_compiler: graph %d: %s", record.id, note)
    return out


def _compile_parts(gm, example_inputs, opts: Options, chosen, record: GraphRecord, target):
    """A graph with DTensor inputs (tensor parallelism): the passes on each part that computes on plain tensors
    (``core/plain_regions.py``), the DTensor parts as Dynamo captured them, then the whole lowered. A part the
    pipeline cannot take (canonicalization fails, a rewrite keeps state about inputs) stays as captured, and the
    report says why; if the cut or the lowering of the whole fails, the Dynamo graph is lowered unchanged."""
    local, local_why = _localize(gm, example_inputs, opts)
    source = gm if local is None or local.gm is None else local.gm  # sharded linears computed locally if proven
    try:
        cut = plain_regions.split(source)
    except Exception as e:  # noqa: BLE001
        if opts.strict or _dynamo_control_flow(e):
            raise
        cut, why = None, f"graph inputs are DTensors and cutting out their plain parts failed ({_brief(e)})"
    else:
        why = "graph inputs are DTensors (tensor parallelism) and no part of it computes on plain tensors"
    if cut is None:
        why += f" (the sharded linears: {local_why})" if local_why else ""
        return _fallback(gm, example_inputs, opts, record, why), (), None, ()
    parent, plain = cut
    carry_dynamo_metadata(gm, parent)  # which inputs are parameters, for AOTAutograd and CUDA graphs
    names, top = [name for name, _ in chosen], plain_regions.graph_input_index(gm)
    mode = fake_mode_of(example_inputs)
    guards, kept = [], []
    record.nodes_in = len(gm.graph.nodes)
    for name in plain:
        part = getattr(parent, name)
        inputs = plain_regions.part_inputs(parent, name, source, example_inputs, mode)
        try:
            if inputs is None:
                raise ValueError("an input's example value is unknown")
            cgm, fake_mode, fake_inputs = canonicalize(part, inputs)
            manager = PassManager(chosen, record, fake_mode, fake_inputs, inputs, strict=opts.strict,
                                  verify=opts.verify, constant_buffers=opts.constant_buffers,
                                  pass_timeout_s=opts.pass_timeout_s, target=target, options=opts,
                                  anchored=anchored_passes(part, names))
            manager.run(cgm)
            if manager.hooks:
                raise ValueError("a rewrite keeps state about the part's inputs")
            _checkpointed(cgm, chosen, opts, target, fake_mode, None, record, inputs, fake_inputs, seeded=False)
            places = [ph.name for ph in part.graph.find_nodes(op="placeholder")]
            if manager.guards and len(places) != len(fake_inputs):
                raise ValueError("a rewrite relies on an input the part's trace flattened")
            if any(places[g.index] not in top for g in manager.guards):
                raise ValueError("a rewrite relies on a value computed in the graph")
            regions.restore(cgm)
            unregister_traced_constants(cgm, set())  # a part has no parameters of its own (transformers' Llama)
        except Exception as e:  # noqa: BLE001 - this part stays as captured
            if opts.strict or _dynamo_control_flow(e):
                raise
            kept.append(f"{name} ({_brief(e)})")
            continue
        guards += [dataclasses.replace(g, index=top[places[g.index]]) for g in manager.guards]
        parent.meta.update({k: v for k, v in cgm.meta.items() if k == TRACED_CASTS})  # read by the lowering
        setattr(parent, name, cgm)
    record.nodes_out = len(parent.graph.nodes)
    record.guards = [guard.to_json() for guard in guards]
    record.parts = {"plain": len(plain), "rewritten": len(plain) - len(kept), "kept": kept,
                    "local_linears": None if local is None else {"colwise": local.colwise, "rowwise": local.rowwise,
                                                                 "copies": local.copies, "scatters": local.scatters,
                                                                 "kept": local.kept},
                    "local_why": local_why}
    try:
        fn = lower(record.lowering, parent, example_inputs, opts.mode, opts.inductor_config)
    except XlaUnavailable:
        raise
    except Exception as e:  # noqa: BLE001
        if opts.strict or _dynamo_control_flow(e):
            raise
        record.parts = None
        return _fallback(gm, example_inputs, opts, record, f"lowering the cut graph failed ({_brief(e)})"), (), None, ()
    return fn, guards, gm if guards else None, ()


def _localize(gm, example_inputs, opts: Options):
    """``(Localized or None, why not)``: ``passes/tp_linears.py`` on a tensor-parallel graph."""
    try:
        local = tp_linears.localize(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - the linears stay DTensor ops
        if opts.strict or _dynamo_control_flow(e):
            raise
        return None, f"computing the sharded linears locally failed ({_brief(e)})"
    return local, "" if local.gm is not None else "no column- or row-parallel linear proven"


def _dynamo_control_flow(e: Exception) -> bool:
    """Dynamo signals "restart tracing" or "skip this frame" with exceptions: never swallow them."""
    exc = torch._dynamo.exc
    kinds = tuple(getattr(exc, n) for n in ("RestartAnalysis", "SkipFrame") if hasattr(exc, n))
    return isinstance(e, kinds)


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _finish(record: GraphRecord, opts: Options, start: float) -> None:
    record.compile_ms = (time.perf_counter() - start) * 1e3
    if record.dump:
        append_report(os.path.dirname(record.dump), record.to_json())
    publish(record)
    summary = ", ".join(f"{p.name}={p.matches}" + ("" if p.status == "ok" else f" [{p.status}]") for p in record.passes)
    log.info(
        "graph %d: lowering=%s passes: %s; %.1f ms%s",
        record.id, record.lowering, summary or "none", record.compile_ms,
        f"; fallbacks: {record.fallbacks}" if record.fallbacks else "",
    )
