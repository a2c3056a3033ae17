"""FP8 for users: calibration for static scaling, scale state to save and load, overflow counts.

    model = torch.compile(model, backend="kernelpytorch", options={"fp8": {"recipe": "delayed"}})
    ...train...
    torch.save({"model": model.state_dict(), "fp8": kp_compiler.fp8.state_dict(model)}, path)
    kp_compiler.fp8.load_state_dict(model, ckpt["fp8"])   # before or after compiling

    kp_compiler.fp8.calibrate(model, batches)             # static scaling, for inference
    model = torch.compile(model, backend="kernelpytorch", options={"fp8": {"recipe": "static"}})

    kp_compiler.fp8.events(model)   # {"layers.0.mlp.up_proj": {"x": 0, "w": 0, "grad": 1}, ...}

    kp_compiler.fp8.all_gather_in_fp8(model, exclude=["lm_head"])  # FSDP2 all-gathers these weights in FP8
    for block in model.layers: fully_shard(block)
    ...optimizer.step(); kp_compiler.fp8.precompute_all_gather_scales(model)   # one all-reduce, not one per weight

``model`` is the ``nn.Module`` (the compiled wrapper works too: its
parameters are the module's). State is per weight parameter
(``ops/fp8_state.py``); the dynamic recipes keep none.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Optional, Sequence

import torch

from .ops.fp8_all_gather import FP8GatherWeight, precompute_amaxes
from .ops.fp8_quant import amax, fp8_max
from .ops.fp8_scaled import SCALE
from .ops.fp8_state import attach, events, load_state_dict, new_state, state_dict

__all__ = ["all_gather_in_fp8", "calibrate", "precompute_all_gather_scales", "events", "load_state_dict", "state_dict"]


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



def all_gather_in_fp8(model: torch.nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                      dtype: torch.dtype = torch.float8_e4m3fn, shard_group_size: Optional[int] = None) -> list:
    """Have FSDP2 all-gather the weights of ``model``'s ``nn.Linear`` layers in FP8 (``ops/fp8_all_gather.py``).

    Call it on the unsharded model, before ``fully_shard``. Each selected weight's
    data is wrapped so that FSDP2 sends its shard as ``dtype`` bytes with one
    tensorwise scale (one scalar all-reduce per weight and all-gather) and
    dequantizes it on arrival; with ``options["fp8"]`` (the default tensorwise
    recipe) the ``fp8-linear`` pass then runs the same FP8 GEMM as without this,
    on half the bytes gathered.

    Args:
        model: the module, not yet sharded (its parameters plain tensors), without
            tensor parallelism (refused at the first all-gather).
        include, exclude: ``fnmatch`` patterns on the linear's module path
            (``layers.0.mlp.up_proj``); a linear is wrapped if it matches an
            ``include`` and no ``exclude`` pattern.
        dtype: the FP8 format on the wire: the pass's weight format, E4M3
            (``float8_e4m3fnuz`` on MI300).
        shard_group_size: the ranks FSDP2 shards over; default the world size where
            a process group is up. Weights whose rows do not split evenly over them
            are left alone (FSDP2 would pad their shards, which this does not handle).

    Returns:
        The module paths whose weights were wrapped. Weights whose dimensions are not
        multiples of 16 (no scaled GEMM takes them) are left alone.

    A linear the pass keeps in ``param_dtype`` (below its size table, or excluded
    there) computes with the FP8-rounded weight, and another recipe than
    tensorwise re-quantizes it (two roundings); the pass's notes name both.
    Select the linears the pass converts (``kp_compiler.explain`` lists them).
    Checkpoints hold the plain weights. Not supported: ``reshard_after_forward``
    given as an int, and assigning ``param.data`` (the wrapper keeps its data).
    """
    if dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise ValueError(f"all_gather_in_fp8: dtype must be the weights' FP8 format (E4M3), got {dtype}")
    if shard_group_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        shard_group_size = torch.distributed.get_world_size()
    wrapped = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(fnmatch.fnmatch(path, p) for p in include) or any(fnmatch.fnmatch(path, p) for p in exclude):
            continue
        weight = module.weight
        if type(weight.data) is not torch.Tensor:
            raise TypeError(f"all_gather_in_fp8: {path}.weight is a {type(weight.data).__name__}, not a plain "
                            "tensor: call all_gather_in_fp8 once, before fully_shard, on a model without tensor "
                            "parallelism")
        rows, cols = weight.shape
        if rows % 16 or cols % 16 or not weight.is_floating_point() or rows % (shard_group_size or 1):
            continue
        module.weight = torch.nn.Parameter(FP8GatherWeight(weight.data, dtype), requires_grad=weight.requires_grad)
        wrapped.append(path)
    return wrapped


def precompute_all_gather_scales(model: torch.nn.Module, group=None) -> int:
    """One all-reduce for the scales of every weight ``all_gather_in_fp8`` wrapped, instead of one per weight
    and all-gather: call it after each optimizer step (on every rank). Each scale is kept with the count of the
    weight's in-place writes it was taken at, so a weight written since (a step without this call) takes its
    own all-reduce again: a stale scale is never used. Returns how many weights it covered."""
    weights = []
    for p in model.parameters():
        local = getattr(p, "_local_tensor", p)  # FSDP2's sharded DTensor parameter's shard (the object its
        # all-gathers call), or the parameter itself
        if isinstance(local, FP8GatherWeight):
            weights.append(local)
    precompute_amaxes(weights, group)
    return len(weights)
