"""``kp::multi_linear(x, weights) -> y``: the linears of one input as one op, outputs side by side.

``y[..., a_g:b_g] = x @ weights[g].T``: the outputs concatenated along the last dim, in the order of
``weights`` (the pass splits them apart again: ``passes/linear/group.py``). No bias; inference only (no
autograd formula: the pass emits it only in graphs compiled without a backward).

- On CUDA with at most ``triton_multi_linear.MAX_ROWS`` rows, in bf16/fp16 and with weights the kernel
  reads (``supported``): one Triton launch over every weight (``ops/triton_multi_linear.py``).
- Otherwise one ``mm`` per weight, each written into its columns of ``y`` (cuBLAS takes the row stride as
  its leading dimension: no copy). The number of rows is read when the op runs, not when the graph is
  compiled, so a dynamic batch stays dynamic.
"""

from __future__ import annotations

import importlib.util
from typing import List

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _check(x: torch.Tensor, weights: List[torch.Tensor]) -> None:
    if not weights:
        raise ValueError("kp::multi_linear: no weights")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"kp::multi_linear: weight of shape {tuple(w.shape)} does not take inputs of "
                             f"{x.shape[-1]} features")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"kp::multi_linear: weight {w.dtype} on {w.device} for an input {x.dtype} on {x.device}")


def reference(x2d: torch.Tensor, weights: List[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """One ``mm`` per weight into its columns of ``y``."""
    col = 0
    for w in weights:
        n = w.shape[0]
        torch.mm(x2d, w.t(), out=y[:, col:col + n])
        col += n
    return y


@torch.library.custom_op("kp::multi_linear", mutates_args=())
def multi_linear(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    _check(x, weights)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    n = sum(w.shape[0] for w in weights)
    y = torch.empty(x2d.shape[0], n, device=x.device, dtype=x.dtype)
    if x.is_cuda and _HAS_TRITON:
        from . import triton_multi_linear
        if triton_multi_linear.supported(x2d, weights):
            try:
                with torch.no_grad():
                    triton_multi_linear.run(x2d, weights, y)
                return y.view(*x.shape[:-1], n)
            except triton_multi_linear.NoTileFits:
                pass  # one cuBLAS GEMM per weight, below
    with torch.no_grad():
        reference(x2d, weights, y)
    return y.view(*x.shape[:-1], n)


@multi_linear.register_fake
def _(x, weights):
    _check(x, weights)
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))
