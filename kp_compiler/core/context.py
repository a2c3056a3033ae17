"""What a pass may know beyond the graph: example values, and runtime guards.

Some rewrites are only valid for the values an input has now, for example a
registered ``tril`` buffer that makes a mask causal. A pass may then look at
the example value (``example_value(placeholder)``) and must add a ``Guard``:
the compiled graph checks it on every call and runs the unrewritten graph
when it fails. Outside a pass manager run there is no context and
``current()`` is None: passes must then not rely on values.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import fx

from .target import Target

_local = threading.local()


@dataclass(frozen=True)
class Guard:
    """Input ``index`` is still the same tensor, unmodified since compile time."""

    index: int
    version: int
    data_ptr: int
    reason: str

    def holds(self, args: Sequence[Any]) -> bool:
        t = args[self.index]
        return isinstance(t, torch.Tensor) and t._version == self.version and t.data_ptr() == self.data_ptr

    def to_json(self) -> dict:
        return {"input": self.index, "reason": self.reason}


@dataclass
class PassContext:
    graph_inputs: list  # placeholder nodes, in call order
    real_inputs: list  # the example values Dynamo gave, same order
    guards: list = field(default_factory=list)
    constant_buffers: bool = False  # options["constant_buffers"]: registered buffers' values may be relied on
    notes: list = field(default_factory=list)  # remarks for the pass's report entry (how to enable a rewrite)
    target: Optional[Target] = None  # what the graph is compiled for (core/target.py)
    options: Any = None  # the parsed ``kp_compiler.options.Options`` (None outside the backend)
    guards_by_design: list = field(default_factory=list)  # why this pass's shape guards are meant (see below)
    # Called with the graph's inputs before every call of the compiled graph (never fail, unlike guards): a
    # rewrite that keeps state about input tensors updates it here. ``hook.inputs``: the indices it reads,
    # left as given when the pass manager verifies the rewrite on random inputs.
    hooks: list = field(default_factory=list)

    def example_value(self, node: fx.Node) -> Optional[Any]:
        """The example value of a placeholder (None for anything else)."""
        if node.op != "placeholder" or node not in self.graph_inputs:
            return None
        return self.real_inputs[self.graph_inputs.index(node)]

    def shape_guards_by_design(self, why: str) -> None:
        """The shape guards this pass adds are meant (a rewrite that needs a concrete size says so): the pass
        manager records them with ``why`` in the report instead of warning that a size was read by mistake."""
        if why not in self.guards_by_design:
            self.guards_by_design.append(why)

    def guard_unchanged(self, node: fx.Node, reason: str) -> Guard:
        value = self.example_value(node)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"guard_unchanged needs a tensor input, got {node.name}")
        guard = Guard(self.graph_inputs.index(node), value._version, value.data_ptr(), reason)
        if guard not in self.guards:
            self.guards.append(guard)
        return guard


def current() -> Optional[PassContext]:
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def active(ctx: PassContext) -> Iterator[PassContext]:
    previous = current()
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous


def for_graph(gm: fx.GraphModule, real_inputs: Sequence[Any], constant_buffers: bool = False,
              target: Optional[Target] = None, options: Any = None) -> PassContext:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return PassContext(placeholders, list(real_inputs), constant_buffers=constant_buffers, target=target,
                       options=options)
