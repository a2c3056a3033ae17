"""``CompiledGraph``: what the backend returns to Dynamo for one graph."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional, Sequence

from ..core.report import GraphRecord

log = logging.getLogger("kp_compiler.runtime")


class CompiledGraph:
    """Calls the lowered graph; carries its ``GraphRecord`` for inspection.

    Dynamo calls it with the flat graph inputs and gets the graph outputs.
    ``record`` says which lowering ran, what each pass did, and any fallback.

    ``guards`` are facts about input values that some rewrite relied on (a
    causal ``tril`` buffer, say). They are checked on every call; when one
    fails, ``fallback`` (the graph without the rewrites) runs instead, and
    the record says so once.

    ``hooks`` run with the inputs before every call, guards or not (state a
    rewrite keeps about input tensors: ``core/context.py``).
    """

    def __init__(self, fn: Callable, record: GraphRecord, guards: Sequence = (),
                 fallback: Optional[Callable] = None, hooks: Sequence = ()):
        if guards and fallback is None:
            raise ValueError("a CompiledGraph with guards needs a fallback")
        self.fn = fn
        self.record = record
        self.guards = tuple(guards)
        self.fallback = fallback
        self.hooks = tuple(hooks)
        self._warned = False

    def __call__(self, *args: Any) -> Any:
        for hook in self.hooks:
            hook(args)
        if self.guards and not all(g.holds(args) for g in self.guards):
            return self._run_fallback(args)
        return self.fn(*args)

    def _run_fallback(self, args) -> Any:
        if not self._warned:
            failed = [g.reason for g in self.guards if not g.holds(args)]
            msg = (f"kp_compiler: graph {self.record.id}: an input changed since compile time ({failed}); "
                   "running the graph without the rewrites that relied on it")
            self.record.fallback(msg)
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._warned = True
        return self.fallback(*args)

    def __repr__(self) -> str:
        return f"CompiledGraph(id={self.record.id}, lowering={self.record.lowering!r})"
