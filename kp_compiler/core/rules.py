"""A declarative rewrite engine: patterns over ATen nodes, rules, rule sets.

A ``Rule`` pairs a pattern with a replacement function; a ``RuleSet`` is an
ordered list of rules run over a graph to a fixed point. Every match is
counted per rule and attributed to the file and line where the rule was
written, so the report says exactly which rule fired.

Example (the shape of ``kp_compiler.passes.cleanup.noop``)::

    from kp_compiler.core.rules import P, Rule, RuleSet
    aten = torch.ops.aten

    x = P.var("x")
    drop_mul_one = Rule(P(aten.mul.Tensor, x, P.lit(1)), lambda m, x: x)
    cleanup = RuleSet("my-cleanup", [drop_mul_one])
    kp_compiler.register_pass("my-cleanup", cleanup)

Before::

    %mul = aten.mul.Tensor(%x, 1) : f32[4, 8]
    %relu = aten.relu.default(%mul) : f32[4, 8]

After::

    %relu = aten.relu.default(%x) : f32[4, 8]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch import fx

from .graph import fake_execution, is_mutating

_ANY = object()


class P:
    """A pattern over one FX node (or one argument value).

    ``P(target, *args, name=None, where=None, **kwargs)`` matches a
    ``call_function`` node whose target is ``target`` (an ``OpOverload``;
    an ``OpOverloadPacket`` matches any overload; a tuple matches any of its
    members) and whose leading positional args and the named kwargs match
    the sub-patterns. Args beyond those given are not constrained, so match
    exact overloads where an extra argument changes the meaning.

    Sub-patterns are ``P`` objects or plain values (compared with ``==``).
    ``name`` captures the matched node; ``where(node_or_value)`` is an extra
    predicate. ``a | b`` tries ``a`` then ``b``.
    """

    def __init__(self, target=_ANY, *args, name=None, where=None, **kwargs):
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.name = name
        self.where = where
        self._is_var = False
        self._lit = _ANY

    @classmethod
    def var(cls, name: Optional[str] = None, where: Optional[Callable] = None) -> "P":
        """Any argument (node or constant), captured as ``name``."""
        p = cls(name=name, where=where)
        p._is_var = True
        return p

    @classmethod
    def lit(cls, value, name: Optional[str] = None) -> "P":
        """A Python number equal to ``value`` (``1`` matches ``1`` and ``1.0``, not ``True``)."""
        p = cls(name=name)
        p._lit = value
        return p

    def __or__(self, other: "P") -> "P":
        return _Alt(self, other)

    def match(self, value: Any, captures: dict) -> bool:
        """Match ``value``, adding captures on success (``captures`` untouched on failure)."""
        trial = dict(captures)
        if not self._match(value, trial):
            return False
        captures.clear()
        captures.update(trial)
        return True

    def _match(self, value: Any, caps: dict) -> bool:
        if self._lit is not _ANY:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok and value == self._lit):
                return False
        elif not self._is_var and not self._match_node(value, caps):
            return False
        if self.where is not None and not self.where(value):
            return False
        return _capture(caps, self.name, value)

    def _match_node(self, value: Any, caps: dict) -> bool:
        if not isinstance(value, fx.Node) or value.op != "call_function":
            return False
        if self.target is not _ANY and not _target_matches(self.target, value.target):
            return False
        if len(value.args) < len(self.args):
            return False
        for pat, arg in zip(self.args, value.args):
            if not _match_arg(pat, arg, caps):
                return False
        for key, pat in self.kwargs.items():
            if key not in value.kwargs or not _match_arg(pat, value.kwargs[key], caps):
                return False
        return True

    def __repr__(self) -> str:
        if self._is_var:
            return f"P.var({self.name!r})"
        if self._lit is not _ANY:
            return f"P.lit({self._lit!r})"
        return f"P({self.target}, {', '.join(map(repr, self.args))})"


class _Alt(P):
    def __init__(self, *alts: P):
        super().__init__()
        self.alts = alts

    def _match(self, value: Any, caps: dict) -> bool:
        return any(alt.match(value, caps) for alt in self.alts)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.alts))


def _capture(caps: dict, name: Optional[str], value: Any) -> bool:
    if name is None:
        return True
    if name in caps:
        return caps[name] is value or (not isinstance(value, fx.Node) and caps[name] == value)
    caps[name] = value
    return True


def _match_arg(pat: Any, arg: Any, caps: dict) -> bool:
    if isinstance(pat, P):
        return pat._match(arg, caps)
    return not isinstance(arg, fx.Node) and type(arg) is type(pat) and arg == pat


def _target_matches(want, got) -> bool:
    if isinstance(want, tuple):
        return any(_target_matches(w, got) for w in want)
    if isinstance(want, torch._ops.OpOverloadPacket):
        return getattr(got, "overloadpacket", None) is want
    return got is want


@dataclass
class Match:
    """What a rule's replacement function receives: the root node and captures."""

    root: fx.Node
    captures: dict
    state: dict = field(default_factory=dict)  # shared by all matches of one round

    @property
    def graph(self) -> fx.Graph:
        return self.root.graph

    def call(self, target, *args, **kwargs) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before the root; fake value computed."""
        with self.graph.inserting_before(self.root):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = _fake_value(target, args, kwargs)
        return node


def _fake_value(target, args, kwargs):
    from torch._guards import detect_fake_mode

    def unwrap(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    fargs = fx.node.map_aggregate(args, unwrap)
    fkwargs = fx.node.map_aggregate(kwargs, unwrap)
    leaves = pytree.tree_leaves((fargs, fkwargs))
    mode = detect_fake_mode([v for v in leaves if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    with fake_execution(mode):
        return target(*fargs, **fkwargs)



@dataclass
class Rule:
    """``pattern`` + ``replace(match, **captures) -> Node | None``.

    ``replace`` returns the node that takes the root's place (an existing one,
    or one built with ``match.call``), or ``None`` to decline: that is where a
    rule proves its preconditions. ``source`` is filled with ``file:line`` of
    the rule's definition.
    """

    pattern: P
    replace: Callable[..., Optional[fx.Node]]
    name: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.source:
            frame = sys._getframe(2)  # caller of the dataclass __init__
            self.source = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        if not self.name:
            self.name = getattr(self.replace, "__name__", "rule")

    @property
    def key(self) -> str:
        return f"{self.name} ({self.source})"


class Matches(int):
    """A match count that also carries the per-rule breakdown for the report."""

    by_rule: dict
    notes: list  # lines for the report and ``explain`` (why something was kept, per-node decisions)

    def __new__(cls, by_rule: dict, notes=()):
        obj = super().__new__(cls, sum(by_rule.values()))
        obj.by_rule = dict(by_rule)
        obj.notes = list(notes)
        return obj


class RuleSet:
    """An ordered list of rules run over a graph until none fires.

    A ``RuleSet`` is itself a pass: ``ruleset(gm) -> Matches`` (an ``int``).
    Rule sets compose with ``+``. Nodes left unused by a rewrite are erased
    if they have no side effects.
    """

    def __init__(self, name: str, rules: Iterable[Rule], max_rounds: int = 32):
        self.name = name
        self.rules = list(rules)
        self.max_rounds = max_rounds

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(f"{self.name}+{other.name}", self.rules + other.rules, self.max_rounds)

    def __call__(self, gm: fx.GraphModule) -> Matches:
        counts = {rule.key: 0 for rule in self.rules}
        for _ in range(self.max_rounds):
            fired = self._one_round(gm.graph, counts)
            if not fired:
                break
        else:
            busy = [k for k, v in counts.items() if v]
            raise RuntimeError(
                f"rule set {self.name!r} did not reach a fixed point after "
                f"{self.max_rounds} rounds; rules still firing: {busy}. "
                "A rule probably undoes another."
            )
        if any(counts.values()):
            gm.recompile()
        return Matches(counts)

    def _one_round(self, graph: fx.Graph, counts: dict) -> int:
        fired = 0
        erased: set[int] = set()
        state: dict = {}  # analyses rules may cache for this round
        for node in list(graph.nodes):
            if id(node) in erased or node.op != "call_function" or not node.users:
                continue
            for rule in self.rules:
                captures: dict = {}
                if not rule.pattern.match(node, captures):
                    continue
                new = rule.replace(Match(node, captures, state), **_kwargs(captures))
                if new is None or new is node:
                    continue
                node.replace_all_uses_with(new)
                erase_unused(node, erased)
                counts[rule.key] += 1
                fired += 1
                break
        return fired

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {len(self.rules)} rules)"


def _kwargs(captures: dict) -> dict:
    return {k: v for k, v in captures.items() if k.isidentifier()}


def erase_unused(root: fx.Node, erased: Optional[set] = None) -> None:
    """Erase a replaced ``root``, then whatever it alone kept alive if side-effect free.

    The root goes even if FX calls it impure for drawing random numbers (a
    rule replaced it, so its value is not needed); in-place ops never go.
    """
    erased = set() if erased is None else erased
    if root.users or is_mutating(root):
        return
    inputs = root.all_input_nodes
    root.graph.erase_node(root)
    erased.add(id(root))
    work = list(inputs)
    while work:
        n = work.pop()
        if id(n) in erased or n.users or n.op != "call_function" or n.is_impure() or is_mutating(n):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(id(n))
        work.extend(inputs)
