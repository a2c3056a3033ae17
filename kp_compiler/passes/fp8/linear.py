"""``fp8-linear``: ``linear(x, weight)`` onto ``kp::fp8_linear`` / ``kp::fp8_linear_scaled`` where FP8 pays (issue 7).

Opt-in with ``options={"fp8": {...}}`` (``kp_compiler.options``); it runs
after the passes, like the attention kernel choice, because whether FP8 pays
depends on the device and the shapes. Every ``aten.linear`` whose weight is
a graph input (a parameter) gets a decision, reported per linear in
``explain`` and in the dump (``# fp8: ...``):

- the module path (from the parameter's name) must match ``include``
  (default: everything) and none of ``exclude`` (``fnmatch`` globs such as
  ``"*.lm_head*"``);
- static shapes, ``K`` and ``N`` multiples of 16 (``torch._scaled_mm``'s
  alignment), floating input;
- the device's row of ``SIZE_TABLE``: the smallest ``M`` (tokens), ``K`` and
  ``N`` at which FP8 was measured faster than bf16, for training graphs or
  for inference graphs (compiled under ``torch.no_grad()``). A device without a row
  is not converted. ``min_dims`` replaces the row (on a device with FP8
  matmuls). ``emulate=True`` converts on any device, through the op's exact
  emulation where no FP8 kernel exists (tests, numerics studies), with the
  thresholds in ``min_dims`` (default: the H100 row).

Before::

    %linear = aten.linear.default(%x, %w, %b) : bf16[8192, 14336]

After::

    %fp8_linear = kp.fp8_linear.default(%x, %w, %b, 'tensorwise', torch.float8_e4m3fn, torch.float8_e5m2, True, True)  # fp8: converted

(an inference graph: weight cached, fast accumulation). A training graph gets
``kp::fp8_linear_train`` (``ops/fp8_train.py``), and linears that read one
input share its cast (``kp::fp8_cast_pair`` + ``kp::fp8_linear_shared``). With
``fuse_gated=True`` (opt-in: not measured faster), a gated MLP whose three
linears convert then becomes one ``kp::fp8_gated_mlp_train``
(``passes/fp8/gated.py``).
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import erase_dead, val
from ...core.pattern import P
from ...core.rules import Matches
from ...ops import fp8 as _fp8  # noqa: F401  (registers kp::fp8_linear)
from ...ops import fp8_shared as _fp8_shared  # noqa: F401  (registers kp::fp8_cast_pair, kp::fp8_linear_shared)
from ...ops import fp8_train as _fp8_train  # noqa: F401  (registers kp::fp8_linear_train)
from ...ops import fp8_traced
from ...core.devices import DeviceInfo, fp8_dtypes
from ...core.fp8_options import FP8Options, parse_fp8
from ...ops import fp8_state
from ...ops.fp8_all_gather import gathered_in_fp8
from ..tp_rewrite import shard_param
from .gated import fuse_gated_mlps

aten = torch.ops.aten

# Smallest (M, K, N) from which FP8 (dynamic tensorwise scaling) was measured faster than bf16, per
# device, for inference graphs (weights quantized once) and training graphs (forward and both backward
# GEMMs, every tensor cast per step). H100, GPU time of one linear per shape
# (scripts/gpu_fp8_sizes.py, bench/results/2026-11-24-h100-fp8-sizes.txt, M 1024 to 8192, K and N
# 1024 to 14336): with K, N >= 4096, inference wins from M = 2048 (1.22x at 2048x4096x4096, 1.03x at
# M = 1024) and training from M = 4096 (1.14x at 4096^3; 1.00x at 2048x4096x4096); below K or N = 4096
# it lost or tied everywhere but at M = 8192 (4096x4096x1024: 0.71x / 0.80x; 8192x1024x4096: 1.17x /
# 0.88x). ../shared/anchors.md: 1024^3 5.6x and 16x4096x4096 2x slower.
SIZE_TABLE = {
    (9, 0): {"inference": (2048, 4096, 4096), "training": (4096, 4096, 4096)},
}
# Training graphs cast an input that several converted linears read once (ops/fp8_shared.py), so a
# linear beside a converted one pays for its weight's and gradient's casts only. The smallest N at
# which such a linear (M and K at the training row) was measured to pay: on the H100 the Llama step
# with its K/V projections (4096 x 4096 x 1024, beside Q) in FP8 ran 0.8% faster
# (bench/results/2026-11-24-h100-fp8-kv.md), though that shape alone is 0.80x.
SHARED_MIN_N = {(9, 0): 1024}
BELOW_TABLE = "below the size table's"  # the refusal that beside_converted may overturn


def module_path(weight: fx.Node) -> str:
    """``model.layers.0.mlp.up_proj.weight`` from Dynamo's placeholder name for that parameter."""
    name = shard_param(weight.name) or weight.name  # a tensor-parallel weight's local shard (passes/tp_rewrite.py)
    for prefix in ("l_self_modules_", "l_self_", "l_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace("_modules_", ".").replace("_parameters_", ".").rstrip("_")


def thresholds(device: DeviceInfo, emulate: bool, min_dims, train: bool = True) -> Optional[tuple]:
    """The smallest ``(M, K, N)`` converted: ``min_dims`` where given (on a device with FP8, or with
    ``emulate``), else the device's row of ``SIZE_TABLE`` for training or inference graphs (the H100
    row with ``emulate``)."""
    if min_dims is not None and (emulate or (device.kind == "cuda" and fp8_dtypes(device))):
        return tuple(min_dims)
    if not emulate and (device.kind != "cuda" or not fp8_dtypes(device)):
        return None
    row = SIZE_TABLE[(9, 0)] if emulate else SIZE_TABLE.get(device.capability)
    return None if row is None else row["training" if train else "inference"]


# What the pass converts: ``linear(x, w)`` or ``linear(x, w, b)``; ``decide`` says which and why.
LINEAR = P(aten.linear.default, P.var("x"), P.var("w"))


def decide(node: fx.Node, device: DeviceInfo, fp8: FP8Options, train: bool = True) -> tuple[bool, str]:
    """(convert, why) for one ``aten.linear`` node."""
    found = LINEAR.find(node)
    x, w = found["x"], found["w"]
    path = module_path(w) if isinstance(w, fx.Node) else "?"
    if not (isinstance(w, fx.Node) and w.op == "placeholder"):
        return False, "weight is not a parameter of the graph"
    if fp8.include and not any(fnmatch.fnmatch(path, p) for p in fp8.include):
        return False, "not in options['fp8']['include']"
    if any(fnmatch.fnmatch(path, p) for p in fp8.exclude):
        return False, "in options['fp8']['exclude']"
    xv, wv = val(x), val(w)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or wv.dim() != 2:
        return False, "not a floating 2-D weight linear"
    k, n = wv.shape[1], wv.shape[0]
    if not all(isinstance(s, int) for s in (k, n, xv.shape[-1])):
        return False, "symbolic K or N"
    m, symbolic = 1, ""
    for s in xv.shape[:-1]:
        m *= s
    if not isinstance(m, int):  # a dynamic token count: decided at the example's size, with no guard on it
        hint = size_hint(m)
        if hint is None:
            return False, "symbolic token count with no example size"
        m, symbolic = hint, " (M symbolic: the example's)"
    if k % 16 or n % 16:
        return False, f"K={k}, N={n} not multiples of 16 (scaled-matmul alignment)"
    limits = thresholds(device, fp8.emulate, fp8.min_dims, train)
    if limits is None:
        return False, f"no FP8 size table for {device.kind} {device.capability or ''}".rstrip()
    if m < limits[0] or k < limits[1] or n < limits[2]:
        return False, f"M={m}, K={k}, N={n} {BELOW_TABLE} {limits} (FP8 measured slower there)"
    return True, f"M={m}, K={k}, N={n}{symbolic}"



def size_hint(value) -> Optional[int]:
    """The example's value of a symbolic size, read without adding a guard (None where there is none)."""
    import warnings

    from torch.fx.experimental import symbolic_shapes as sym

    for name in ("optimization_hint", "size_hint", "hint_int"):  # torch 2.13; 2.11 (hint_int warns there); 2.9
        fn = getattr(sym, name, None)
        if fn is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                hint = fn(value, fallback=None)
        except Exception:  # noqa: BLE001 - an unbacked size has no hint
            return None
        return None if hint is None else int(hint)
    return None


def beside_converted(node: fx.Node, device: DeviceInfo, fp8: FP8Options) -> Optional[str]:
    """Why a training linear kept by the size table's N converts anyway when its input is already cast for
    a converted linear (``SHARED_MIN_N``), or None. Not with ``min_dims`` (the user's thresholds hold)."""
    if fp8.min_dims is not None:
        return None
    key = (9, 0) if fp8.emulate else device.capability
    limits, min_n = thresholds(device, fp8.emulate, None, True), SHARED_MIN_N.get(key)
    xv, wv = val(node.args[0]), val(node.args[1])
    if limits is None or min_n is None:
        return None
    m, k, n = xv.numel() // xv.shape[-1], wv.shape[1], wv.shape[0]
    m = m if isinstance(m, int) else size_hint(m)
    if m is not None and m >= limits[0] and k >= limits[1] and min_n <= n < limits[2]:
        return f"M={m}, K={k}, N={n}: below the size table's N, input cast shared with a converted linear"
    return None


def fp8_linears(gm: fx.GraphModule, device: DeviceInfo, fp8: FP8Options, train: bool = True) -> Matches:
    """Convert the linears ``decide`` accepts; every decision goes to the report's notes.

    ``train=False`` (a graph compiled under ``torch.no_grad()``) lets the ops
    keep each weight quantized between calls (``ops/fp8_weights.py``).
    """
    fp8 = parse_fp8(fp8)  # FP8Options (a dict is parsed, for callers outside the backend)
    recipe = fp8.recipe
    converted, decisions = {}, {}
    for node in list(gm.graph.nodes):
        if LINEAR.find(node) is None:
            continue
        ok, why = decide(node, device, fp8, train)
        state = None
        if ok and recipe in STATEFUL and _is_shard(node.args[1]):
            ok, why = False, f"a tensor-parallel shard: the {recipe} recipe keeps its state per parameter"
        if ok and recipe in STATEFUL:
            state, refusal = _state(node.args[1], recipe, fp8)
            ok, why = (False, refusal) if refusal else (ok, why)
        decisions[node] = (ok, why, state)
    shared = train and recipe == "tensorwise"
    if shared:  # kept by the size table's N only, beside a converted linear that reads the same input
        cast_inputs = {node.args[0] for node, (ok, _, _) in decisions.items() if ok}
        for node, (ok, why, state) in decisions.items():
            if not ok and BELOW_TABLE in why and node.args[0] in cast_inputs:
                beside = beside_converted(node, device, fp8)
                if beside is not None:
                    decisions[node] = (True, beside, state)
    notes, plan = [], []
    for node, (ok, why, state) in decisions.items():
        path = module_path(node.args[1]) if isinstance(node.args[1], fx.Node) else node.name
        notes.append(f"{path}: {'converted' if ok else 'kept'} ({why})")
        if not ok and _fp8_gathered(node.args[1]):
            notes.append(f"{path}: its weight was all-gathered in FP8 (kp_compiler.fp8.all_gather_in_fp8), so this "
                         "linear computes with the FP8-rounded weight: leave it out of all_gather_in_fp8 to keep it "
                         "exact")
        elif ok and recipe != "tensorwise" and _fp8_gathered(node.args[1]):
            notes.append(f"{path}: its weight was all-gathered in FP8 with a tensorwise scale; the {recipe} recipe "
                         "quantizes it again (two roundings): use the tensorwise recipe with all_gather_in_fp8")
        if not ok:
            node.meta["kp_note"] = f"fp8: kept ({why})"
            continue
        plan.append((node, why, state))
    formats, fast = _formats(device, fp8.emulate) if plan else None, fp8.fast_accum
    # Training graphs, default recipe: linears that read one input cast it once (ops/fp8_shared.py).
    readers: dict = {}
    if shared:
        for node, _, _ in plan:
            readers.setdefault(node.args[0], []).append(node)
    casts: dict = {}
    for node, why, state in plan:
        x = node.args[0]
        if len(readers.get(x, ())) > 1:
            if x not in casts:
                casts[x] = _emit_cast(gm, readers[x][0], formats[0])
            new = _emit_shared(gm, node, casts[x], formats, fast)
        else:
            new = _emit(gm, node, recipe, formats, state, not train and not _is_shard(node.args[1]), fast)
        new.meta["val"] = val(node)
        new.meta["kp_note"] = f"fp8: converted, {recipe}{', input cast shared' if x in casts else ''} ({why})"
        if not train and _is_shard(node.args[1]):
            notes.append(f"{module_path(node.args[1])}: a tensor-parallel shard, quantized on every call (an "
                         "in-place update of the parameter does not bump the shard's version, so a cached "
                         "copy could go stale)")
        node.replace_all_uses_with(new)
        erase_dead([node])
        converted[recipe] = converted.get(recipe, 0) + 1
    if shared and converted and fp8.fuse_gated:
        fused = fuse_gated_mlps(gm)  # gated MLPs: the product's casts fused (passes/fp8/gated.py)
        if fused:
            converted["gated-mlp"] = fused
            notes.append(f"{fused} gated MLP(s) in one op each, the product's casts fused (options['fp8']['fuse_gated'])")
    if shared and converted and fp8.casts == "inductor" and device.kind in fp8_traced.DEVICES:
        gm.meta[fp8_traced.TRACED_CASTS] = True  # read by lowering/decompositions.table
        notes.append("the training ops' ATen bodies go to Inductor, which generates and fuses the casts "
                     "(options['fp8']['casts']='inductor'; other lowerings run the ops' own kernels)")
    if converted:
        gm.recompile()
    return Matches(converted, notes)


STATEFUL = ("delayed", "static")


def _is_shard(weight) -> bool:
    """Whether the weight is a tensor-parallel parameter's local shard (``passes/tp_linears.py``)."""
    return isinstance(weight, fx.Node) and shard_param(weight.name) is not None


def _fp8_gathered(weight) -> bool:
    """Whether the weight's example value arrived through FSDP2's FP8 all-gather (``ops/fp8_all_gather.py``)."""
    ctx = context.current()
    return isinstance(weight, fx.Node) and ctx is not None and gathered_in_fp8(ctx.example_value(weight))


def _state(weight: fx.Node, recipe: str, fp8: FP8Options):
    """``(LayerState, None)``, or ``(None, why not)`` when the layer cannot take ``recipe``."""
    ctx = context.current()
    param = ctx.example_value(weight) if ctx is not None else None
    if not isinstance(param, torch.Tensor):
        return None, "no example value for the weight, so no place to keep its scale state"
    if recipe == "static":
        state = fp8_state.calibrated(param)
        return (state, None) if state is not None else (None, "static recipe: not calibrated (run "
                                                                "kp_compiler.fp8.calibrate(model, batches) first)")
    return fp8_state.layer_state(param, "delayed", fp8.history_len, fp8.margin), None


def _emit(gm: fx.GraphModule, node: fx.Node, recipe: str, formats: tuple, state, cache: bool, fast: bool) -> fx.Node:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    fwd, grad = formats
    graph = gm.graph
    with graph.inserting_before(node):
        if state is None and recipe == "tensorwise" and not cache:
            # training: the op also returns the FP8 operands its backward reuses (ops/fp8_train.py)
            both = graph.call_function(torch.ops.kp.fp8_linear_train.default, (x, w, bias, fwd, grad, fast))
            return graph.call_function(operator.getitem, (both, 0))
        if state is None:
            return graph.call_function(torch.ops.kp.fp8_linear.default, (x, w, bias, recipe, fwd, grad, cache, fast))
        rows = {}
        for role, t in state.rows().items():
            rows[role] = graph.get_attr(_register_state(gm, f"kp_fp8_{node.name}_{role}", t))
        margin = float(state.margin)
        sx = graph.call_function(torch.ops.kp.fp8_scale_update.default,
                                 (rows["x"], graph.call_function(aten.detach.default, (x,)), fwd, margin,
                                  "delayed" if recipe == "delayed" else "frozen"))
        sw = None
        if recipe == "delayed":
            sw = graph.call_function(torch.ops.kp.fp8_scale_update.default,
                                     (rows["w"], graph.call_function(aten.detach.default, (w,)), fwd, margin, "delayed"))
        return graph.call_function(torch.ops.kp.fp8_linear_scaled.default,
                                   (x, w, bias, sx, sw, rows["grad"], recipe, fwd, grad, margin, cache, fast))


def _emit_cast(gm: fx.GraphModule, first: fx.Node, dtype) -> tuple:
    """``q(x), q(x).T, sx`` nodes, once, before the first linear that reads ``x``."""
    graph = gm.graph
    with graph.inserting_before(first):
        pair = graph.call_function(torch.ops.kp.fp8_cast_pair.default, (first.args[0], dtype))
        return tuple(graph.call_function(operator.getitem, (pair, i)) for i in range(3))


def _emit_shared(gm: fx.GraphModule, node: fx.Node, cast: tuple, formats: tuple, fast: bool) -> fx.Node:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    graph = gm.graph
    with graph.inserting_before(node):
        out = graph.call_function(torch.ops.kp.fp8_linear_shared.default, (x, *cast, w, bias, *formats, fast))
        return graph.call_function(operator.getitem, (out, 0))


def _register_state(gm: fx.GraphModule, base: str, t: torch.Tensor) -> str:
    """``t`` as a buffer of ``gm``; AOTAutograd lifts it to an input and writes its mutations back."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, t)
    if hasattr(gm, "_param_name_to_source"):
        # AOTAutograd maps every buffer of a Dynamo graph to a source; this state comes from no user code.
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source = {**gm._param_name_to_source, name: ConstantSource(name)}
    return name


def _formats(device: DeviceInfo, emulate: bool) -> tuple:
    dtypes = fp8_dtypes(device)
    if len(dtypes) == 2:
        return dtypes
    if emulate:
        return torch.float8_e4m3fn, torch.float8_e5m2
    raise ValueError(f"fp8-linear: {device.kind} has no FP8 formats")


def convert_fp8_linears(gm: fx.GraphModule) -> Matches:
    """The ``fp8-linear`` pass: ``fp8_linears`` with ``options["fp8"]`` on the graph's target.

    Before::

        %linear = aten.linear.default(%x, %w, %b) : bf16[8192, 4096]

    After (inference, default recipe)::

        %fp8_linear = kp.fp8_linear.default(%x, %w, %b, ...) : bf16[8192, 4096]
    """
    ctx = context.current()
    fp8 = getattr(getattr(ctx, "options", None), "fp8", None)
    if ctx is None or ctx.target is None or fp8 is None:
        return Matches({}, [])
    return fp8_linears(gm, ctx.target.device, fp8, ctx.target.training)


def fp8_applies(target, options) -> "str | None":
    """``fp8-linear`` applies only when ``options["fp8"]`` turns FP8 on, and not under ``torch.autocast``."""
    if getattr(options, "fp8", None) is None:
        return "FP8 is off (options['fp8'])"
    if getattr(target, "autocast", False):
        return AUTOCAST
    return None


AUTOCAST = ("torch.autocast is on: the FP8 ops have no autocast rule, so they would take the fp32 activations and "
            "return fp32 where eager's linears return the autocast dtype; cast the model to bf16 instead")
