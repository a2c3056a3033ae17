"""The pass registry and the manager that runs passes safely.

A pass is any ``fn(gm: torch.fx.GraphModule) -> int`` that rewrites ``gm``
in place and returns how many rewrites it made (a ``RuleSet`` is one). The
manager runs the chosen passes in order and, for each one:

- times it and records its match count (per rule, for rule sets);
- checks the result: ``graph.lint()`` and shape propagation under the fake
  mode must pass, which also refreshes ``meta["val"]`` for the next pass, and
  the outputs' dtypes, shapes and devices must be what they were;
- with ``verify``, runs the graph before and after on random inputs and
  compares;
- on any failure restores the graph as it was before the pass, records
  ``rolled_back`` with the reason and warns; with ``strict`` it raises;
- records the shape guards it added (``guards_added``: a symbolic size read
  as a number, which makes Dynamo recompile per size) and warns; with
  ``strict`` that is an error too.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

from torch import fx

from . import context
from . import graph as g
from .dump import GraphDump
from .report import GraphRecord, PassRecord
from .shape_guards import GuardWatch
from .verify import VerifyError, check_same_outputs

log = logging.getLogger("kp_compiler.passes")

PassFn = Callable[[fx.GraphModule], int]

_REGISTRY: dict[str, PassFn] = {}
Anchor = Union[str, Callable[[fx.Node], bool]]
_ANCHORS: dict[str, Optional[tuple[Anchor, ...]]] = {}  # per pass: what it needs in a Dynamo graph (see register_pass)
_APPLIES: dict[str, Callable] = {}  # per pass: applies(target, options) -> None, or why it does not apply
_DEFAULT: list[str] = []
_LISTENERS: list = []  # called after the registry changes (the backend renews its identity for Dynamo)


class PassError(RuntimeError):
    """A pass failed under ``strict=True``."""


class PassTimeout(RuntimeError):
    """Raised inside a pass that ran past ``options["pass_timeout_s"]`` (it is then rolled back)."""


WARN_AFTER_S = 30.0  # a pass still running after this long gets a warning that names it


class _Watchdog:
    """Warns, naming the pass, once it has run ``warn_after`` seconds; with ``timeout`` interrupts it.

    The interruption raises ``PassTimeout`` in the compiling thread at its
    next Python bytecode (a pass blocked inside one C call is interrupted
    when that call returns); the pass manager then rolls the pass back.
    """

    def __init__(self, name: str, timeout: Optional[float]):
        self.name, self.timeout = name, timeout
        self.thread = threading.get_ident()
        warn_after = min(WARN_AFTER_S, timeout) if timeout else WARN_AFTER_S
        self.timers = [threading.Timer(warn_after, self._warn, (warn_after,))]
        if timeout:
            self.timers.append(threading.Timer(timeout, self._interrupt))
        self.interrupted = False
        self.done = False
        self.lock = threading.Lock()

    def __enter__(self):
        for t in self.timers:
            t.daemon = True
            t.start()
        return self

    def __exit__(self, *exc):
        with self.lock:  # after this no interruption is sent: it can only land inside the pass's block
            self.done = True
        for t in self.timers:
            t.cancel()

    def _warn(self, seconds: float) -> None:
        msg = (f"kp_compiler: pass {self.name!r} has been running for {seconds:g} s"
               + (f"; it is interrupted at {self.timeout:g} s (options['pass_timeout_s'])" if self.timeout else
                  "; bound it with options['pass_timeout_s']"))
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=1)

    def _interrupt(self) -> None:
        with self.lock:
            if self.done:
                return
            self.interrupted = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread), ctypes.py_object(PassTimeout))


def register_pass(name: str, fn: PassFn, *, default: bool = False, replace: bool = False,
                  anchors: Optional[Sequence[Anchor]] = None, applies: Optional[Callable] = None) -> PassFn:
    """Register ``fn`` as the pass ``name`` so ``options={"passes": [...]}`` can select it.

    Args:
        name: unique name, kebab-case by convention (``"fuse-my-op"``).
        fn: ``fn(gm) -> int``; rewrites ``gm`` in place, returns the number
            of rewrites (``0`` if nothing matched).
        default: also append it to ``default_passes()`` (built-ins use this).
        replace: allow re-registering an existing name.
        anchors: op names without which the pass has nothing to do, matched
            (case-insensitively, as substrings) against the targets of the
            Dynamo graph's calls: ``("softmax",)`` for a pass that starts
            from a softmax. An anchor may also be a predicate on a Dynamo
            graph node (its docstring's first line names it in the report),
            for a call that only counts with certain arguments (an SDPA call
            with an ``attn_mask``). ``()`` for a pass that only prepares the graph
            for other passes. ``None`` (the default): the pass always runs.
            When every chosen pass has anchors and none is in a graph, the
            graph skips canonicalization and the passes and is lowered as
            Dynamo captured it (no compile-time cost over the lowering).
        applies: ``applies(target, options) -> None | str``: ``None`` when
            the pass applies to this target (``core/target.py``) and options,
            else why not; the pass is then not run and the report lists it
            as "not applicable on this target: <why>". Default: always.

    Returns:
        ``fn``, so this works as a decorator via ``functools.partial``.
    """
    if not callable(fn):
        raise TypeError(f"register_pass({name!r}, ...): fn must be callable, got {type(fn).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"pass name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a pass named {name!r} is already registered; pass replace=True to override it")
    changed = name in _REGISTRY and _REGISTRY[name] is not fn
    _REGISTRY[name] = fn
    _ANCHORS[name] = None if anchors is None else tuple(a.lower() if isinstance(a, str) else a for a in anchors)
    if applies is None:
        _APPLIES.pop(name, None)
    else:
        _APPLIES[name] = applies
    if default and name not in _DEFAULT:
        _DEFAULT.append(name)
    if changed:
        _registry_changed()
    return fn


def unregister_pass(name: str) -> None:
    _ANCHORS.pop(name, None)
    _APPLIES.pop(name, None)
    if _REGISTRY.pop(name, None) is not None:
        _registry_changed()
    if name in _DEFAULT:
        _DEFAULT.remove(name)


def on_registry_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a registered pass is replaced or removed."""
    _LISTENERS.append(listener)


def _registry_changed() -> None:
    for listener in _LISTENERS:
        listener()


def registered_passes() -> list[str]:
    return sorted(_REGISTRY)


def default_passes() -> list[str]:
    """The default pass list, in order (a copy: insert your own and pass it back)."""
    return list(_DEFAULT)


def resolve(names: Sequence[str]) -> list[tuple[str, PassFn]]:
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown pass name(s) {unknown} in options['passes']; registered passes: "
            f"{registered_passes()} (register yours with kp_compiler.register_pass)"
        )
    return [(n, _REGISTRY[n]) for n in names]


def not_applicable(name: str, target, options) -> Optional[str]:
    """Why the pass ``name`` does not apply to ``target`` and ``options`` (its ``applies``), or ``None``."""
    applies = _APPLIES.get(name)
    return None if applies is None or target is None else applies(target, options)


def idle_reason(gm: fx.GraphModule, names: Sequence[str], target=None, options=None) -> Optional[str]:
    """Why none of the passes ``names`` can do anything on the Dynamo graph ``gm``, or ``None`` if one might.

    Every pass that applies to ``target`` and ``options`` must declare its anchors (``register_pass(...,
    anchors=...)``) and no anchor may occur among the graph's call targets; a pass without declared
    anchors always counts as one that might.
    """
    wanted = []
    for name in names:
        if not_applicable(name, target, options) is not None:
            continue
        anchors = _ANCHORS.get(name)
        if anchors is None:
            return None
        wanted += anchors
    targets = _call_targets(gm)
    for anchor in wanted:
        if isinstance(anchor, str) and any(anchor in t for t in targets):
            return None
        if callable(anchor) and any(anchor(n) for n in _call_nodes(gm)):
            return None
    names = sorted({a if isinstance(a, str) else (a.__doc__ or a.__name__).strip().splitlines()[0] for a in wanted})
    return f"the graph has no {' or '.join(names)}" if wanted else "no pass looks for anything"


def anchored_passes(gm: fx.GraphModule, names: Sequence[str]) -> set[str]:
    """The passes among ``names`` that could find something in ``gm``: one of their declared anchors occurs, or
    they declare none (``None``); a pass that declares ``()`` never has anything of its own to look at. Anchors
    describe Dynamo graphs (``idle_reason``); the backend asks this of the Dynamo graph and hands the answer to
    ``PassManager``. The graph is walked once."""
    targets, nodes = _call_targets(gm), _call_nodes(gm)

    def occurs(anchor) -> bool:
        return any(anchor in t for t in targets) if isinstance(anchor, str) else any(anchor(n) for n in nodes)

    return {n for n in names if _ANCHORS.get(n) is None or any(occurs(a) for a in _ANCHORS[n])}


def _call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every call node of ``gm`` and of the graphs nested in it (regions' bodies)."""
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            out.append(n)
        elif n.op == "get_attr" and isinstance(getattr(gm, str(n.target), None), fx.GraphModule):
            out += _call_nodes(getattr(gm, str(n.target)))
    return out


def _call_targets(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append(f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__name__', n.target)}".lower())
        elif n.op == "call_method":
            out.append(str(n.target).lower())
        elif n.op == "call_module":
            module = gm.get_submodule(n.target)
            out.append(f"{n.target}:{type(module).__name__}".lower())
        elif n.op == "get_attr":  # a nested graph (a region's body) is searched too
            sub = getattr(gm, str(n.target), None)
            if isinstance(sub, fx.GraphModule):
                out += _call_targets(sub)
    return out


class PassManager:
    """Runs named passes over one canonical graph, recording each in ``record``."""

    def __init__(
        self,
        passes: Sequence[tuple[str, PassFn]],
        record: GraphRecord,
        fake_mode,
        fake_inputs: Sequence[Any],
        real_inputs: Sequence[Any],
        strict: bool = False,
        verify: bool = False,
        dump: Optional[GraphDump] = None,
        constant_buffers: bool = False,
        pass_timeout_s: Optional[float] = None,
        target=None,
        options=None,
        anchored: Optional[set] = None,
    ):
        self.passes = list(passes)
        # passes whose anchors the Dynamo graph holds (backend.py); None: looked up in the graph run() gets
        self.anchored = anchored
        self.record = record
        self.fake_mode = fake_mode
        self.fake_inputs = list(fake_inputs)
        self.real_inputs = list(real_inputs)
        self.strict = strict
        self.verify = verify
        self.dump = dump
        self.constant_buffers = constant_buffers
        self.pass_timeout_s = pass_timeout_s
        self.target = target  # core.target.Target: what passes read to decide whether they apply
        self.options = options
        self.shape_guards = GuardWatch(fake_mode)
        self.guards: list = []  # runtime guards the kept rewrites rely on
        self.hooks: list = []  # what the kept rewrites run before every call (context.PassContext.hooks)
        # The graph before the first pass that added guards: valid whatever the guarded inputs hold.
        self.unguarded: Optional[fx.Graph] = None

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        for name, fn in self.passes:
            why = not_applicable(name, self.target, self.options)
            if why is not None:
                if self.anchored is None:
                    self.anchored = anchored_passes(gm, [n for n, _ in self.passes])
                if name in self.anchored:  # a pass with nothing to look at in this graph goes unmentioned
                    self.record.skipped.append({"pass": name, "reason": f"not applicable on this target: {why}"})
                continue
            self.run_pass(gm, name, fn)
        return gm

    def run_pass(self, gm: fx.GraphModule, name: str, fn: PassFn) -> PassRecord:
        """Run one pass with the same checks, record and dump (also used for lowering-side rewrites)."""
        rec = PassRecord(name=name)
        self.record.passes.append(rec)
        self._run_one(gm, name, fn, rec)
        log.debug("pass %s: %s, %d matches, %.2f ms", name, rec.status, rec.matches, rec.ms)
        if self.dump is not None:
            header = f"after {name} | status {rec.status} | matches {rec.matches}"
            self.dump.write(name, gm.graph, header)
        return rec

    def _run_one(self, gm: fx.GraphModule, name: str, fn: PassFn, rec: PassRecord) -> None:
        before = g.snapshot(gm)
        before_print = g.fingerprint(gm.graph)
        ctx = context.for_graph(gm, self.real_inputs, self.constant_buffers, self.target, self.options)
        mark = self.shape_guards.mark()
        start = time.perf_counter()
        watchdog = _Watchdog(name, self.pass_timeout_s)
        try:
            with context.active(ctx), watchdog:
                result = fn(gm)
            rec.ms = (time.perf_counter() - start) * 1e3
            rec.matches = _as_count(name, result)
            rec.by_rule = {k: v for k, v in getattr(result, "by_rule", {}).items() if v}
            rec.notes = [*getattr(result, "notes", []), *dict.fromkeys(ctx.notes)]
            changed = g.fingerprint(gm.graph) != before_print
            if changed:
                self._check(gm, before, self.guards + ctx.guards, self.hooks + ctx.hooks)
        except Exception as e:  # noqa: BLE001 - any pass failure is rolled back
            rec.ms = (time.perf_counter() - start) * 1e3
            if isinstance(e, PassTimeout) or watchdog.interrupted:
                e = PassTimeout(f"ran past options['pass_timeout_s']={self.pass_timeout_s} s")
            self._note_shape_guards(name, rec, mark)
            self._fail(gm, before, name, rec, e)
            return
        self._note_shape_guards(name, rec, mark, ctx.guards_by_design)
        if ctx.guards and self.unguarded is None:
            self.unguarded = before
        self.guards += ctx.guards
        self.hooks += ctx.hooks

    def _note_shape_guards(self, name: str, rec: PassRecord, mark, by_design: tuple = ()) -> None:
        rec.guards_added = self.shape_guards.added_since(mark)
        if not rec.guards_added:
            return
        why = "; ".join(by_design)
        self.record.guards_added += [{"step": name, "guard": text, **({"why": why} if why else {})}
                                     for text in rec.guards_added]
        if by_design:  # the pass said these guards are meant: in the report, not a warning
            rec.notes.append(f"shape guards by design ({why}): {rec.guards_added}")
            log.info("pass %s added shape guards by design (%s): %s", name, why, rec.guards_added)
            return
        msg = (f"kp_compiler: pass {name!r} added shape guard(s) {rec.guards_added}: it read a symbolic size "
               "as a number, so Dynamo recompiles this graph for other sizes")
        if self.strict:
            raise PassError(msg + " (strict=True)")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _check(self, gm: fx.GraphModule, before: fx.Graph, guards: list, hooks: list = ()) -> None:
        gm.graph.lint()
        gm.recompile()
        g.propagate_shapes(gm, self.fake_mode, self.fake_inputs)
        was, now = g.output_signature(before), g.output_signature(gm.graph)
        if was != now:  # cheap, so always: a rewrite must not change what the user gets back
            raise VerifyError(f"the graph outputs changed from {was} to {now}")
        if self.verify:
            reference = fx.GraphModule(gm, before)
            # Guarded inputs keep their example values: the rewrite is only claimed for those; so do inputs a
            # hook keeps state about (tables of their addresses: the clones verify passes are not hooked).
            keep = {gd.index for gd in guards} | {i for hook in hooks for i in hook.inputs}
            check_same_outputs(reference, gm, self.real_inputs, keep=keep)

    def _fail(self, gm, before, name: str, rec: PassRecord, err: Exception) -> None:
        g.restore(gm, before)
        rec.matches = 0
        rec.by_rule = {}
        kind = "verify" if isinstance(err, VerifyError) else type(err).__name__
        rec.reason = f"{kind}: {err}"
        if self.strict:
            rec.status = "failed"
            raise PassError(f"pass {name!r} failed (strict=True): {rec.reason}") from err
        rec.status = "rolled_back"
        msg = f"kp_compiler: pass {name!r} was rolled back: {rec.reason}"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _as_count(name: str, result: Any) -> int:
    if isinstance(result, bool) or not isinstance(result, int):
        raise TypeError(f"pass {name!r} must return the number of rewrites (an int), got {result!r}")
    if result < 0:
        raise ValueError(f"pass {name!r} returned a negative match count {result}")
    return int(result)
