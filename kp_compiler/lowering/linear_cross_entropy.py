"""Which implementation runs the rows' part of ``kp::linear_cross_entropy`` on CUDA.

| device | logits | implementation |
|---|---|---|
| CUDA, Triton imports | bf16, fp16, fp32, unit stride along the vocabulary | ``ops/triton_cross_entropy.py`` (one kernel: the logits read twice, the gradient written in place) |
| anything else (CPU, fp64) | | ``linear_cross_entropy.rows`` (ATen) |

The GEMMs around it are ATen's (cuBLAS) either way. The kernel does the ATen version's work in one pass over
the logits instead of about a dozen: on the H200, 0.27 ms for a 1024 x 128256 bf16 chunk against ATen's 2.52
(``scripts/gpu_lce_rows_sweep.py``). ``KP_LCE_ROWS=triton|aten`` forces one where it can run; any other value
is an error.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..ops import linear_cross_entropy as ops

IMPLEMENTATIONS = ("triton", "aten")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _forced() -> str:
    forced = os.environ.get("KP_LCE_ROWS", "")
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"KP_LCE_ROWS={forced!r} is not one of {IMPLEMENTATIONS}")
    return forced


def choose(dtype: torch.dtype, triton: bool = _HAS_TRITON) -> str:
    """``"triton"`` for CUDA logits the kernel reads (unless ``KP_LCE_ROWS=aten``), else ``"aten"``."""
    can = triton and dtype in (torch.bfloat16, torch.float16, torch.float32)
    return "triton" if can and _forced() != "aten" else "aten"


def _rows(z, labels, ignore_index, smoothing, softcap, scale, out=None):
    if choose(z.dtype) == "triton" and z.stride(1) == 1:
        from ..ops import triton_cross_entropy
        return triton_cross_entropy.rows(z, labels, ignore_index, smoothing, softcap, scale, out=out)
    return ops.rows(z, labels, ignore_index, smoothing, softcap, scale, out=out)


def _cuda(h, w, b, labels, ignore_index, label_smoothing, reduction, softcap, chunk, weight_grads=True):
    ops._check(h, w, b, labels, reduction, softcap, chunk)
    with torch.no_grad():
        return ops.forward(h, w, b, labels, ignore_index, label_smoothing, reduction, softcap, chunk, rows_fn=_rows,
                           weight_grads=weight_grads)


torch.library.register_kernel("kp::linear_cross_entropy", "cuda", _cuda)
