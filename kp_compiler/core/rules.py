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
from typing import Callable, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch import fx

from .graph import erase_dead, fake_execution, is_mutating
from .pattern import P  # noqa: F401  (the rule API's pattern: ``from kp_compiler.core.rules import P`` keeps working)

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
        node.meta["val"] = fake_value(target, args, kwargs)
        return node


def fake_value(target, args, kwargs):
    """``target(*args, **kwargs)`` on the nodes' fake values (``meta["val"]``), or None without a fake mode."""
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
        erased: set = set()
        state: dict = {}  # analyses rules may cache for this round
        for node in list(graph.nodes):
            if node in erased or node.op != "call_function" or not node.users:
                continue
            for rule in self.rules:
                captures: dict = {}
                if not rule.pattern.match(node, captures):
                    continue
                new = rule.replace(Match(node, captures, state), **_kwargs(captures))
                if new is None or new is node:
                    continue
                node.replace_all_uses_with(new)
                if not is_mutating(node):  # in-place ops stay: their effect is not the value
                    erased |= erase_dead([node])
                counts[rule.key] += 1
                fired += 1
                break
        return fired

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {len(self.rules)} rules)"


def _kwargs(captures: dict) -> dict:
    return {k: v for k, v in captures.items() if k.isidentifier()}
