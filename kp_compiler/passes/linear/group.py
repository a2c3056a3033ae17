"""``linear-group``: the linears that read one input become one ``kp::multi_linear`` (issue 18).

Under CUDA graphs a decode step's time is its kernels' GPU time, and a small linear at a few rows costs a
fixed ~5.5 us on an H200 whatever its weight (the q, k and v projections of a d=2048 Llama: 2-8 MB each,
``bench/results/2026-12-02-h200-decode-kernels-ce01986.txt``). One launch over the three pays it once
(``ops/triton_multi_linear.py``), reading each weight where the model keeps it: no packed copy, so no
memory over the model's and no staleness when a weight is updated in place.

Before::

    %linear = aten.linear.default(%x, %w_q) : bf16[s0, 1, 2048]
    %linear_1 = aten.linear.default(%x, %w_k) : bf16[s0, 1, 512]
    %linear_2 = aten.linear.default(%x, %w_v) : bf16[s0, 1, 512]

After::

    %multi_linear = kp.multi_linear.default(%x, [%w_q, %w_k, %w_v]) : bf16[s0, 1, 3072]
    %split = aten.split_with_sizes.default(%multi_linear, [2048, 512, 512], -1)
    %getitem = getitem(%split, 0) ...

Applies (``applies``) to inference graphs on CUDA GPUs of compute capability 8.0 and up with Triton, under
``mode="reduce-overhead"``: the kernel saves GPU time, which is the step's time only under CUDA graphs; in
default mode a decode step is host-bound and one Python op in place of three ATen calls saves nothing.
Per group: 3 or 4 linears of the same node without biases (``MIN_WEIGHTS``: two, as gate and up, measured
0.98-1.12x), each weight a 2-D parameter of the graph (or a tensor-parallel parameter's local shard) with a
row count that is a multiple of 16, one dtype (bf16/fp16) with ``x``, together at most ``MAX_BYTES`` (the
largest group measured), and ``x`` not known to hold more than ``triton_multi_linear.MAX_ROWS`` rows. Rows above that when the op runs (a dynamic batch) take one cuBLAS
GEMM per weight: the row count is read at run time, never as a guard.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import AliasFacts, erase_dead, fake_execution, is_mutating, val
from ...core.rules import Matches, fake_value
from ...ops import multi_linear as _multi_linear  # noqa: F401  (registers kp::multi_linear)
from ...ops.triton_multi_linear import MAX_ROWS, MAX_WEIGHTS
from ..tp_rewrite import is_parameter

aten, kp = torch.ops.aten, torch.ops.kp

# Measured on the H200 (bench/results/2026-12-02-h200-multi-linear-kernel-d2f00de.txt), one launch against one
# cuBLAS GEMM per weight: q, k, v 2.06-3.34x at d=1024 and 2048, 1.61-1.78x at d=4096 (48 MiB of weights); gate
# and up at d=2048 (44 MiB, two weights) 0.98-1.12x. So groups of three or four weights up to 48 MiB.
MIN_WEIGHTS = 3
MAX_BYTES = 48 << 20


def applies(target, options) -> Optional[str]:
    """Inference graphs on CUDA 8.0 and up under ``mode="reduce-overhead"`` (the module docstring says why)."""
    if getattr(options, "mode", "default") != "reduce-overhead":
        return "only under mode='reduce-overhead', where a step's time is its kernels' GPU time"
    if target.training:
        return "a backward runs in this graph: kp::multi_linear has no autograd formula"
    if target.autocast:
        return ("torch.autocast is on: kp::multi_linear has no autocast rule, so its outputs would keep the input's "
                "dtype where eager's linears take the autocast dtype")
    if getattr(options, "fp8", None):
        return "options['fp8'] is on: the fp8-linear pass converts these linears"
    device = target.device
    if not (device.kind == "cuda" and (device.capability or (0, 0)) >= (8, 0)):
        return f"the few-row kernel runs on CUDA GPUs of compute capability 8.0 and up, not {device.kind}"
    if not _multi_linear._HAS_TRITON:
        return "Triton is not installed"
    return None


def _plain_linear(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.linear.default or len(node.args) < 2:
        return False
    if any(k != "bias" for k in node.kwargs):
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias is None and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], fx.Node)


def _refusal(x: fx.Node, lin: fx.Node) -> Optional[str]:
    weight = lin.args[1]
    ctx = context.current()
    if weight.op != "placeholder" or (ctx is not None and not is_parameter(weight, ctx.example_value(weight))):
        return "the weight is not a parameter of the graph"  # (a TP parameter's local shard is one)
    w, xv = val(weight), val(x)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or xv.dtype not in (torch.bfloat16, torch.float16):
        return "not a 2-D weight in bf16/fp16"
    if w.dtype != xv.dtype or val(lin).dtype != xv.dtype:
        return "the weight's or the output's dtype is not the input's"
    if not isinstance(w.shape[0], int) or w.shape[0] % 16:
        return "the weight's rows are not a multiple of 16"
    return None


def _rows_known_above(xv: torch.Tensor) -> bool:
    """``x`` holds more than ``MAX_ROWS`` rows for certain (static sizes only: a symbolic size is not read)."""
    rows = 1
    for s in xv.shape[:-1]:
        if not isinstance(s, int):
            return False
        rows *= s
    return rows > MAX_ROWS


def _views_stay_valid(lin: fx.Node, part) -> Optional[str]:
    """Why the linear's output may not become ``part`` (a strided column slice of the op's output), or None.

    Its readers then see row stride ``sum(N)`` where eager's output has ``N``. Ops read any strides; each view
    reader is re-run on the strided value (fake tensors) in case one cannot take it. The output itself must not
    be a graph output (the caller would get a strided slice where eager returns a whole tensor); a view of it
    may be (transformers returns the value projection in its cache as a transposed view): the caller then gets
    the slice's strides, the same values."""
    mode = getattr(part, "fake_mode", None)
    pending = [(lin, part)]
    while pending:
        node, value = pending.pop()
        for user in node.users:
            if user.op == "output":
                if node is lin:
                    return "its output is a graph output: the caller would get a strided slice, not eager's tensor"
                continue  # a view of it: the caller gets the slice's strides (docs/passes/cudagraphs.md)
            if user.op == "call_function" and user.target is operator.getitem and isinstance(value, (list, tuple)):
                pending.append((user, value[user.args[1]]))
                continue
            if user.op != "call_function" or not getattr(user.target, "is_view", False):
                continue
            args = fx.node.map_aggregate(
                user.args, lambda a: value if a is node else a.meta.get("val") if isinstance(a, fx.Node) else a)
            try:
                with fake_execution(mode):
                    out = user.target(*args, **user.kwargs)
            except Exception:  # noqa: BLE001 - the view does not fit the strided output
                return f"{user.name} needs the output with eager's strides"
            pending.append((user, out))
    return None




def linear_group(gm: fx.GraphModule) -> Matches:
    """Replace each qualifying group of linears of one input with ``kp::multi_linear`` and a split."""
    graph = gm.graph
    notes, count = [], 0
    aliases = AliasFacts(graph)
    position = {n: i for i, n in enumerate(graph.nodes)}  # of the nodes as they came: new ones are not read
    writes = [position[n] for n in graph.nodes if is_mutating(n)]
    for x in list(graph.nodes):
        linears = [u for u in x.users if _plain_linear(u) and u.args[0] is x]
        if len(linears) < 2:
            continue
        xv = val(x)
        if not isinstance(xv, torch.Tensor) or _rows_known_above(xv):
            continue
        ok = []
        for lin in linears:
            why = _refusal(x, lin)
            if why is None:
                ok.append(lin)
            else:
                notes.append(f"{lin.name}: left out of {x.name}'s group: {why}")
        ok = sorted(ok, key=position.__getitem__)[:MAX_WEIGHTS]
        if len(ok) < 2:
            continue
        weights = [lin.args[1] for lin in ok]
        nbytes = sum(val(w).numel() * val(w).element_size() for w in weights)
        if len(ok) < MIN_WEIGHTS or nbytes > MAX_BYTES:
            notes.append(f"{x.name}: {len(ok)} linears left apart ({nbytes >> 20} MiB of weights): one launch is "
                         f"measured faster for {MIN_WEIGHTS} to {MAX_WEIGHTS} weights up to {MAX_BYTES >> 20} MiB")
            continue
        between = any(position[ok[0]] < w < position[ok[-1]] for w in writes)  # the op moves later linears up
        if between or any(aliases.is_mutated(n) for n in (x, *weights)):
            notes.append(f"{x.name}: {len(ok)} linears left apart: the input or a weight is written in place")
            continue
        sizes = [val(w).shape[0] for w in weights]
        fused_val = fake_value(kp.multi_linear.default, (x, weights), {})
        parts = fake_value(aten.split_with_sizes.default, (fused_val, sizes, -1), {})
        why = next(filter(None, (_views_stay_valid(lin, part) for lin, part in zip(ok, parts))), None)
        if why is not None:
            notes.append(f"{x.name}: {len(ok)} linears left apart: {why}")
            continue
        with graph.inserting_before(ok[0]):
            fused = graph.call_function(kp.multi_linear.default, (x, weights))
            fused.meta["val"] = fused_val
            split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
            split.meta["val"] = parts
            for i, lin in enumerate(ok):
                part = graph.call_function(operator.getitem, (split, i))
                part.meta["val"] = parts[i]
                lin.replace_all_uses_with(part)
        erase_dead(ok)
        count += 1
    graph.lint()
    return Matches({"group": count} if count else {}, notes)
