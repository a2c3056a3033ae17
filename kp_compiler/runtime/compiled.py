"""``CompiledGraph``: what the backend returns to Dynamo for one graph."""

from __future__ import annotations

from typing import Any, Callable

from ..core.report import GraphRecord


class CompiledGraph:
    """Calls the lowered graph; carries its ``GraphRecord`` for inspection.

    Dynamo calls it with the flat graph inputs and gets the graph outputs.
    ``record`` says which lowering ran, what each pass did, and any fallback.
    """

    def __init__(self, fn: Callable, record: GraphRecord):
        self.fn = fn
        self.record = record

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"CompiledGraph(id={self.record.id}, lowering={self.record.lowering!r})"
