"""Which shape guards a step added: the tell-tale of a symbolic size read as a number.

Dynamo turns every guard in the shape environment into a check on the next
call. A backend step that evaluates a symbolic size (``int(s0)``, ``if
x.shape[0] == 3``, a kernel table keyed on a size) adds a guard such as
``Eq(s0, 3)``: the "dynamic" graph is then recompiled for each new size.
``GuardWatch`` notes how many guards and replacements the shape environment
holds before a step and lists what the step added; the pass manager and the
backend record those lists in the report (``guards_added``).
"""

from __future__ import annotations

from typing import Optional


class GuardWatch:
    """Reads the guards a step added to ``fake_mode``'s shape environment (none without one)."""

    def __init__(self, fake_mode) -> None:
        self.env = getattr(fake_mode, "shape_env", None)

    def mark(self) -> Optional[tuple]:
        if self.env is None:
            return None
        return len(self.env.guards), dict(self.env.replacements)

    def added_since(self, mark: Optional[tuple]) -> list[str]:
        """Guards added since ``mark`` (with the code location that evaluated them, where torch kept it),
        and symbols that became replaced by a number (specialized) since then."""
        if self.env is None or mark is None:
            return []
        count, replacements = mark
        added = []
        for guard in self.env.guards[count:]:
            where = str(getattr(guard, "sloc", "") or "").strip()
            added.append(f"{guard.expr}" + (f" (at {where})" if where else ""))
        for sym, expr in self.env.replacements.items():
            text = f"Eq({sym}, {expr})"
            if sym not in replacements and expr.is_number and not any(a.startswith(text) for a in added):
                added.append(text)
        return added
