"""FP8 for users: calibration for static scaling, scale state to save and load, overflow counts.

    model = torch.compile(model, backend="kernelpytorch", options={"fp8": {"recipe": "delayed"}})
    ...train...
    torch.save({"model": model.state_dict(), "fp8": kp_compiler.fp8.state_dict(model)}, path)
    kp_compiler.fp8.load_state_dict(model, ckpt["fp8"])   # before or after compiling

    kp_compiler.fp8.calibrate(model, batches)             # static scaling, for inference
    model = torch.compile(model, backend="kernelpytorch", options={"fp8": {"recipe": "static"}})

    kp_compiler.fp8.events(model)   # {"layers.0.mlp.up_proj": {"x": 0, "w": 0, "grad": 1}, ...}

``model`` is the ``nn.Module`` (the compiled wrapper works too: its
parameters are the module's). State is per weight parameter
(``ops/fp8_state.py``); the dynamic recipes keep none.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .ops.fp8_quant import amax, fp8_max
from .ops.fp8_scaled import SCALE
from .ops.fp8_state import attach, events, load_state_dict, new_state, state_dict

__all__ = ["calibrate", "events", "load_state_dict", "state_dict"]


def calibrate(model: torch.nn.Module, batches: Iterable, forward: Optional[Callable] = None,
              dtype: torch.dtype = torch.float8_e4m3fn, margin: float = 0.0) -> dict:
    """Run ``batches`` through ``model`` eagerly and freeze each ``nn.Linear``'s activation scale.

    Args:
        model: the (uncompiled) module; every ``nn.Linear`` in it is observed.
        batches: inputs; each is passed as ``model(*batch)`` if a tuple, else ``model(batch)``.
        forward: ``forward(model, batch)`` instead, for other calling conventions.
        dtype: the FP8 format the scales are for (E4M3; ``float8_e4m3fnuz`` on MI300).
        margin: extra headroom, ``scale = amax / fp8_max * 2**margin``.

    Returns:
        ``{module path: activation amax}`` for the layers calibrated. A layer whose
        inputs were all zero (or never ran) is left out, and the ``static`` recipe
        keeps it in high precision.

    The activation scale is frozen (``recipe="static"``); the weight's scale comes
    from the weight itself, quantized once per weight version.
    """
    seen: dict = {}

    def hook(module, args):
        a = amax(args[0], False)
        seen[module] = torch.maximum(seen[module], a) if module in seen else a

    linears = {m: name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            for batch in batches:
                if forward is not None:
                    forward(model, batch)
                else:
                    model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for module, a in seen.items():
        value = float(a)
        if not value > 0:
            continue
        state = new_state(module.weight, "static", 0, margin)
        state.x[SCALE] = value / fp8_max(dtype) * 2.0 ** margin
        attach(module.weight, state)
        result[linears[module]] = value
    return result

