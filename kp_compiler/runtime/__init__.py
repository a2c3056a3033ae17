"""Runtime: the callables Dynamo gets back. No pattern code lives here."""

from .compiled import CompiledGraph

__all__ = ["CompiledGraph"]
