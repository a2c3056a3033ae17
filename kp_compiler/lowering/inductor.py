"""Lowering through Inductor (CUDA, ROCm, XPU, CPU).

``compile_fx`` runs AOTAutograd itself, so the rewritten pre-dispatch graph
gets its backward derived there. ``mode`` maps to Inductor's own settings for
that mode (``reduce-overhead`` turns on CUDA graphs, ``max-autotune*`` turn on
autotuning), then ``options["inductor_config"]`` is applied on top.
"""

from __future__ import annotations


def mode_config(mode: str) -> dict:
    if mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def lower(gm, example_inputs, mode: str, inductor_config: dict):
    from torch._inductor.compile_fx import compile_fx

    patches = mode_config(mode)
    patches.update(inductor_config)
    return compile_fx(gm, list(example_inputs), config_patches=patches or None)
