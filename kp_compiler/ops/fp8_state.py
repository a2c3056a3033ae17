"""FP8 scale state per converted linear (delayed and static scaling), kept across steps.

The state belongs to the weight parameter: ``layer_state(weight, ...)`` finds
or makes one ``LayerState`` per parameter object (a ``WeakIdKeyDictionary``,
so it goes with the model), and every graph compiled for that weight, a
recompile included, reads and updates the same tensors. The ``fp8-linear``
step hands them to the graph as buffers, which the ``kp::fp8_scale_update``
and ``kp::fp8_linear_scaled_backward`` ops mutate in place.

Saving and loading go by module path, as a model's own state dict does:
``state_dict(model)`` is ``{"layers.0.mlp.up_proj": {"x": ..., "w": ...,
"grad": ..., ...}}`` and ``load_state_dict(model, sd)`` copies it back into
the live tensors (so already compiled graphs see it). Kept apart from
``model.state_dict()`` on purpose: the model's keys stay those of the
unconverted model, so a checkpoint loads with or without FP8.

Each row is ``[scale, events, history...]`` (``ops/fp8_scaled.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .fp8_scaled import EVENTS, HISTORY, SCALE

ROLES = ("x", "w", "grad")
_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class LayerState:
    """One linear's scale state: a row per role, on the weight's device."""

    x: torch.Tensor
    w: torch.Tensor
    grad: torch.Tensor
    recipe: str
    history_len: int
    margin: float

    def rows(self) -> dict:
        return {r: getattr(self, r) for r in ROLES}

    def events(self) -> dict:
        return {r: int(t[EVENTS].item()) for r, t in self.rows().items()}

    def scales(self) -> dict:
        return {r: float(t[SCALE].item()) for r, t in self.rows().items()}

    def history(self, role: str) -> torch.Tensor:
        return getattr(self, role)[HISTORY:]


def new_state(weight: torch.Tensor, recipe: str, history_len: int, margin: float) -> LayerState:
    def row():
        return torch.zeros(HISTORY + history_len, dtype=torch.float32, device=weight.device)

    return LayerState(row(), row(), row(), recipe, history_len, margin)


def layer_state(weight: torch.Tensor, recipe: str, history_len: int, margin: float) -> LayerState:
    """The state of ``weight``'s layer; a new one if it has none or one made for other settings."""
    state = _STATES.get(weight)
    if state is None or (state.recipe, state.history_len, state.margin) != (recipe, history_len, margin):
        state = _STATES[weight] = new_state(weight, recipe, history_len, margin)
    return state


def find(weight: torch.Tensor):
    return _STATES.get(weight)


def calibrated(weight: torch.Tensor):
    """``weight``'s static-scaling state if ``kp_compiler.fp8.calibrate`` set its activation scale, else None."""
    state = _STATES.get(weight)
    if state is None or state.recipe != "static" or float(state.x[SCALE]) <= 0:
        return None
    return state


def attach(weight: torch.Tensor, state: LayerState) -> None:
    _STATES[weight] = state


def _layers(model: torch.nn.Module):
    for name, p in model.named_parameters(remove_duplicate=True):
        state = _STATES.get(p)
        if state is not None:
            yield name.removesuffix(".weight"), state


def state_dict(model: torch.nn.Module) -> dict:
    """``{module path: {"x", "w", "grad": rows (copies), "recipe", "history_len", "margin"}}``."""
    return {path: {**{r: t.detach().clone() for r, t in s.rows().items()},
                   "recipe": s.recipe, "history_len": s.history_len, "margin": s.margin}
            for path, s in _layers(model)}


def load_state_dict(model: torch.nn.Module, sd: dict) -> None:
    """Copy ``sd`` into ``model``'s live state (made where missing); unknown paths are a ``KeyError``."""
    params = dict(model.named_parameters())
    unknown = sorted(p for p in sd if p + ".weight" not in params)
    if unknown:
        raise KeyError(f"kp_compiler.fp8.load_state_dict: no weight for {unknown} in the model")
    for path, entry in sd.items():
        weight = params[path + ".weight"]
        state = layer_state(weight, entry["recipe"], entry["history_len"], entry["margin"])
        with torch.no_grad():
            for r, t in state.rows().items():
                t.copy_(entry[r])


def events(model: torch.nn.Module) -> dict:
    """Overflow events (non-finite or zero amax) per layer and role: ``{path: {"x": n, "w": n, "grad": n}}``."""
    return {path: s.events() for path, s in _layers(model)}
