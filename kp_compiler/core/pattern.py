"""Patterns over FX nodes: how every pass recognizes a piece of graph.

A ``P`` describes one node and, through its arguments, the nodes that feed
it. ``pattern.match(node, captures)`` checks a node against it and fills
``captures``; ``pattern.find(node)`` returns the captures or ``None``. The
rule engine (``core.rules``) runs patterns to a fixed point for local
rewrites; the bigger passes (attention, MoE, FP8) call ``find`` from their
own drivers and rewrite whole regions.

What a pattern can say:

- the op: an ``OpOverload``, an ``OpOverloadPacket`` (any overload), any
  other callable target (``operator.getitem``), or a tuple of these;
- its leading positional args and named kwargs, each a sub-pattern, a plain
  value (compared with ``==``, same type) or a list of those;
- ``name=``: capture the node (the same name twice must be the same node);
- ``where=``: a predicate on the node or value;
- ``users=``: how many users the node has (an int), or a predicate on it;
- ``commute=True``: the first two args may come in either order;
- ``P.var(name)``: any value; ``P.lit(2)``: the number 2 (or 2.0);
- ``a | b``: ``a``, else ``b``;
- ``P.skip(through, inner)``: any number of ``through`` links above
  ``inner`` (``max=1``: an optional link), each continuing from its ``via``
  capture; the links are captured as a list of ``(node, captures)``.

Example: ``x * c`` under any number of casts, then a matmul::

    scale = P((aten.mul.Tensor, aten.div.Tensor), P.var("x"), P.var("c", where=number))
    cast = P(aten._to_copy.default, P.var("x"), users=1)
    pat = P.skip(cast | scale, P(aten.matmul.default, P.var("a"), P.var("b")), name="links")

On ``%mm = matmul(%a, %b); %div = div(%mm, 8.0); %cast = _to_copy(%div)``,
``pat.find(cast)`` is ``{"a": a, "b": b, "links": [(cast, {...}), (div, {..., "c": 8.0})]}``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import fx

_ANY = object()


def number(x: Any) -> bool:
    """A Python int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_call(node: Any, *targets) -> bool:
    """``node`` calls one of ``targets`` (the one-node pattern ``P(targets)`` without captures)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and _target_matches(targets, node.target)


class P:
    """A pattern over one FX node (or one argument value); see the module docstring."""

    def __init__(self, target=_ANY, *args, name: Optional[str] = None, where: Optional[Callable] = None,
                 users: Union[int, Callable, None] = None, commute: bool = False, **kwargs):
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.name = name
        self.where = where
        self.users = users
        self.commute = commute
        self._is_var = False
        self._lit = _ANY

    @classmethod
    def var(cls, name: Optional[str] = None, where: Optional[Callable] = None,
            users: Union[int, Callable, None] = None) -> "P":
        """Any argument (node or constant), captured as ``name``."""
        p = cls(name=name, where=where, users=users)
        p._is_var = True
        return p

    @classmethod
    def lit(cls, value, name: Optional[str] = None) -> "P":
        """A Python number equal to ``value`` (``1`` matches ``1`` and ``1.0``, not ``True``)."""
        p = cls(name=name)
        p._lit = value
        return p

    @classmethod
    def skip(cls, through: "P", inner: "P", *, via: str = "x", name: Optional[str] = None,
             max: Optional[int] = None) -> "P":
        """Any number (up to ``max``) of ``through`` links, then ``inner``.

        Greedy: links are peeled while ``through`` matches, each continuing
        from its ``via`` capture; ``inner`` must then match what is left.
        ``name`` captures the links, outermost first, as ``[(node, captures)]``.
        """
        return _Skip(through, inner, via, name, max)

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

    def find(self, value: Any) -> Optional[dict]:
        """The captures of a match of ``value``, or ``None``."""
        captures: dict = {}
        return captures if self.match(value, captures) else None

    def _match(self, value: Any, caps: dict) -> bool:
        if self._lit is not _ANY:
            if not (number(value) and value == self._lit):
                return False
        elif not self._is_var and not self._match_node(value, caps):
            return False
        if self.users is not None and not _users_ok(self.users, value):
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
        orders = [value.args]
        if self.commute and len(value.args) >= 2:
            orders.append((value.args[1], value.args[0], *value.args[2:]))
        for args in orders:
            trial = dict(caps)
            if self._args_match(args, value.kwargs, trial):
                caps.clear()
                caps.update(trial)
                return True
        return False

    def _args_match(self, args, kwargs, caps: dict) -> bool:
        if not all(_match_arg(pat, arg, caps) for pat, arg in zip(self.args, args)):
            return False
        return all(key in kwargs and _match_arg(pat, kwargs[key], caps) for key, pat in self.kwargs.items())

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


class _Skip(P):
    def __init__(self, through: P, inner: P, via: str, name: Optional[str], max: Optional[int]):
        super().__init__(name=name)
        self.through, self.inner, self.via, self.max = through, inner, via, max

    def _match(self, value: Any, caps: dict) -> bool:
        links = []
        while self.max is None or len(links) < self.max:
            link = self.through.find(value)
            if link is None or self.via not in link:
                break
            links.append((value, link))
            value = link[self.via]
        if not self.inner.match(value, caps):
            return False
        if self.name is not None:
            caps[self.name] = links
        return True

    def __repr__(self) -> str:
        return f"P.skip({self.through!r}, {self.inner!r})"


def _users_ok(users, value) -> bool:
    if not isinstance(value, fx.Node):
        return False
    return len(value.users) == users if isinstance(users, int) else bool(users(value))


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
    if isinstance(pat, (list, tuple)) and any(isinstance(p, P) for p in pat):
        return (isinstance(arg, (list, tuple)) and len(arg) == len(pat)
                and all(_match_arg(p, a, caps) for p, a in zip(pat, arg)))
    return not isinstance(arg, fx.Node) and type(arg) is type(pat) and arg == pat


def _target_matches(want, got) -> bool:
    if isinstance(want, tuple):
        return any(_target_matches(w, got) for w in want)
    if isinstance(want, torch._ops.OpOverloadPacket):
        return getattr(got, "overloadpacket", None) is want
    return got is want
