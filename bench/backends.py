"""The backends every case runs under, side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    backend: Optional[str] = None  # None: eager, no torch.compile
    mode: Optional[str] = None
    options: dict = field(default_factory=dict)

    def for_case(self, kp_options: dict) -> "Backend":
        """This backend with a case's own kernelpytorch options merged in (other backends unchanged)."""
        if self.backend != "kernelpytorch" or not kp_options:
            return self
        mode = {"mode": self.mode} if self.mode else {}
        return Backend(self.name, self.backend, None, {**mode, **kp_options, **self.options})

    def wrap(self, model: Any) -> Any:
        if self.backend is None:
            return model
        if self.options:
            return torch.compile(model, backend=self.backend, options=dict(self.options))
        return torch.compile(model, backend=self.backend, mode=self.mode)


STANDARD = {
    "eager": Backend("eager"),
    "inductor": Backend("inductor", "inductor"),
    "inductor-max-autotune": Backend("inductor-max-autotune", "inductor", mode="max-autotune-no-cudagraphs"),
    "kernelpytorch": Backend("kernelpytorch", "kernelpytorch"),
    # CUDA graphs on both sides: Inductor skips them for graphs with data-dependent shapes
    # (an unrolled expert loop), kernelpytorch's rewritten graph has none left.
    "inductor-reduce-overhead": Backend("inductor-reduce-overhead", "inductor", mode="reduce-overhead"),
    "kernelpytorch-reduce-overhead": Backend("kernelpytorch-reduce-overhead", "kernelpytorch", mode="reduce-overhead"),
}
DEFAULT = ("eager", "inductor", "inductor-max-autotune", "kernelpytorch")


def choose(names: list[str], kp_options: Optional[str]) -> list[Backend]:
    """The backends named (``--backends``), plus kernelpytorch with ``--kp-options`` if given."""
    unknown = [n for n in names if n not in STANDARD]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {list(STANDARD)}")
    chosen = [STANDARD[n] for n in names]
    if kp_options:
        opts = json.loads(kp_options)
        label = ",".join(f"{k}={v}" for k, v in opts.items())
        chosen.append(Backend(f"kernelpytorch[{label}]", "kernelpytorch", options=opts))
    return chosen
