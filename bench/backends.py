"""The backends every case runs under, side by side.

Peers that do the same job are rows too: ``torchao-float8-tensorwise`` and ``torchao-float8-rowwise`` convert
the row's copy of the model with torchao's float8 training (``convert_to_float8_training``, the recipe by name;
every ``nn.Linear`` whose dims are multiples of 16) and compile it with Inductor, as torchao's docs do. Where
torchao is not importable the row fails with that message and the other rows run (on the GPU machine it
travels as a wheel in ``.whl/``, which ``bench/gpu_run.sh`` installs). ``liger`` runs a loss case's loss
through Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on the model's hidden states, under Inductor (its
wheel travels the same way).
"""

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
    float8: Optional[str] = None  # a torchao float8 training recipe applied to the model first
    liger: bool = False  # the workload's loss through Liger-Kernel's fused linear cross-entropy

    def for_case(self, kp_options: dict) -> "Backend":
        """This backend with a case's own kernelpytorch options merged in (other backends unchanged)."""
        if self.backend != "kernelpytorch" or not kp_options:
            return self
        mode = {"mode": self.mode} if self.mode else {}
        return Backend(self.name, self.backend, None, {**mode, **kp_options, **self.options})

    def wrap(self, model: Any) -> Any:
        """The callable the row times; ``model`` (the row's own copy) is converted in place where ``float8``."""
        if self.float8 is not None:
            _float8_training(model, self.float8)
        if self.liger:
            _liger_loss(model)
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
for _recipe in ("tensorwise", "rowwise"):
    STANDARD[f"torchao-float8-{_recipe}"] = Backend(f"torchao-float8-{_recipe}", "inductor", float8=_recipe)
STANDARD["liger"] = Backend("liger", "inductor", liger=True)
DEFAULT = ("eager", "inductor", "inductor-max-autotune", "kernelpytorch")


def _liger_loss(model: Any) -> None:
    if not hasattr(model, "liger_loss"):
        raise RuntimeError("this case has no Liger path (only the loss cases, bench/cases/loss.py, have one)")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise RuntimeError(f"liger-kernel is not importable ({e}); the liger row needs it") from e
    model.liger_loss = LigerFusedLinearCrossEntropyLoss()


def _float8_training(model: Any, recipe: str) -> None:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError(f"torchao is not importable ({e}); the torchao-float8 rows need it") from e
    if not isinstance(model, torch.nn.Module):
        raise RuntimeError("torchao's float8 conversion needs an nn.Module workload")
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=_float8_linear)


def _float8_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


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
