"""The decomposition table kernelpytorch hands Inductor: Inductor's own, less ops whose ATen kernel is better,
plus our ops' ATen bodies where a graph calls them (the FP8 training casts, the tensor-parallel collectives).

| op | kept as ATen's kernel when | why |
|---|---|---|
| ``aten.embedding_dense_backward`` | a training graph with CUDA inputs | Inductor's decomposition zeroes an fp32 ``[V, d]`` buffer, adds every token's gradient into it with atomics and casts it to the weight's dtype: at a 128k vocabulary and d=1024 a 0.49 GiB temporary beside the 0.25 GiB result. ATen's CUDA kernel (what eager runs) sorts the indices and sums each row's segment in fp32 straight into a gradient of the weight's dtype. |

Why it matters: with ``linear-cross-entropy`` the logits are gone, and that fp32 buffer was then the largest
thing live at the step's memory peak (``scripts/gpu_lce_profile.py`` on the H200: 0.49 of 1.03 GiB in the
``lce-128k-train`` step, ``bench/results/``). Everywhere else (inference graphs, the CPU) Inductor's table is
used unchanged (``None``: ``compile_fx`` picks its own).

Before / after, the lowered backward of ``embedding(ids, W)`` (bf16, CUDA)::

    %full = aten.full.default([V, d], 0, dtype=torch.float32)          # Inductor's decomposition
    %index_put = aten.index_put.default(%full, [%ids], %grad_fp32, True)
    %grad_w = prims.convert_element_type.default(%index_put, torch.bfloat16)

    %grad_w = aten.embedding_dense_backward.default(%grad, %ids, V, -1, False)  # kept: ATen's kernel
"""

from __future__ import annotations

import functools

import torch

KEPT_ON_CUDA_TRAINING = ("embedding_dense_backward",)


def training(example_inputs) -> bool:
    """Whether a backward may be derived for the graph: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in example_inputs)


def has_cuda_input(example_inputs) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)


def table(example_inputs, patches: dict, gm=None):
    """The table for ``compile_fx(decompositions=...)``: Inductor's (under the config ``patches`` that will
    apply, so a patched ``fallback_random`` is seen) less ``KEPT_ON_CUDA_TRAINING``, for a training graph with a
    CUDA input; plus the FP8 training ops' ATen bodies where the ``fp8-linear`` pass asked for them
    (``options["fp8"]["casts"] = "inductor"``, ``ops/fp8_traced.py``); ``None`` (Inductor's own, chosen by
    ``compile_fx``) otherwise."""
    traced = False
    if gm is not None and gm.meta:
        from ..ops.fp8_traced import TRACED_CASTS

        traced = gm.meta.get(TRACED_CASTS, False)
    cuda_training = training(example_inputs) and has_cuda_input(example_inputs)
    collectives = gm is not None and _holds(gm, _tp_collectives())
    if not (cuda_training or traced or collectives):
        return None
    import torch._inductor.config as config
    from torch._inductor.decomposition import select_decomp_table

    with config.patch(patches):
        decomps = dict(select_decomp_table())
    if cuda_training:
        for name in KEPT_ON_CUDA_TRAINING:
            decomps.pop(getattr(torch.ops.aten, name).default, None)
        _fallbacks()
    if traced:
        from ..ops.fp8_traced import decompositions

        decomps.update(decompositions())
    if collectives:
        decomps.update(_tp_collectives())
    return decomps


def _tp_collectives() -> dict:
    from ..ops.tp_collectives import decompositions

    return decompositions()


def cache_guard(gm):
    """No AOTAutograd cache for a graph that holds the FP8 training ops: its key covers the graph and the
    configs, not the decomposition table, so a graph compiled with ``casts="ops"`` would be served to a later
    ``casts="inductor"`` compile of the same graph, and the other way round (a review found it across processes
    sharing ``TORCHINDUCTOR_CACHE_DIR``). Nor for a graph that holds the tensor-parallel collectives: their
    decomposition reads the group's size (a one-rank group's are views), which the key does not cover, so a
    world-size-1 compile could be served to a 2-rank run of a graph whose inputs have the same shapes. Inductor's
    own FX graph cache still applies: it keys the graph after the decomposition."""
    import contextlib

    if not (_holds_fp8_training_ops(gm) or _holds(gm, _tp_collectives())):
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(enable_autograd_cache=False)


def _holds_fp8_training_ops(gm) -> bool:
    from ..ops.fp8_traced import decompositions

    return _holds(gm, decompositions())


def _holds(gm, ops) -> bool:
    """Whether ``gm`` (or a graph module inside it) calls one of ``ops``."""
    ops = set(ops)
    return any(node.op == "call_function" and node.target in ops
               for module in gm.modules() if isinstance(getattr(module, "graph", None), torch.fx.Graph)
               for node in module.graph.nodes)


@functools.lru_cache(maxsize=None)
def _fallbacks() -> None:
    """Register Inductor's ATen fallback for each kept op (contiguous inputs, as its implicit fallbacks in a
    backward get). Explicit, because torch 2.11 compiles a lazily compiled backward against its default table,
    where the op has a decomposition, and then refuses the implicit fallback ("both a fallback and a decomp for
    same op"). Graphs lowered with Inductor's own table never reach it: the op is decomposed before lowering."""
    from torch._inductor import lowering

    for name in KEPT_ON_CUDA_TRAINING:
        op = getattr(torch.ops.aten, name).default
        if op not in lowering.lowerings:
            lowering.make_fallback(op, layout_constraint=lowering.require_contiguous, warn=False, override_decomp=True)
