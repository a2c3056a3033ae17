"""Which implementation runs ``kp::linear_act`` / ``kp::gated_linear`` (and ``_train``) on CUDA: a table.

| device | dtype | op, shapes | implementation |
|---|---|---|---|
| CUDA | bf16, fp16 | ``kp::linear_act`` with GELU(tanh) or ReLU, 1-D bias or none, a ``(K, N)`` in ``EPILOGUE_SHAPES`` | ``torch._addmm_activation``: cuBLASLt's GEMM with the bias and activation in its epilogue |
| CUDA 8.0 and up, Triton imports | bf16, fp16 | a ``(K, N)`` in ``TRITON_SHAPES``, weights unit stride along ``K`` | ``ops/triton_linear_act.py`` |
| anything else | | | the ATen reference (``ops/linear_act.py``) |

``EPILOGUE_SHAPES`` holds what was measured faster than Inductor's own linear + pointwise on the H200 in GPU
time (``bench/results/2026-12-02-h200-linear-act-paths.txt``: 8192 x 4096 -> 16384 with bias and GELU(tanh),
1.468 against 1.573 ms); in the harness's latency it ties (1.01x, ``...-linear-gelu-871b672.md``). cuBLASLt's
GELU epilogue is the tanh form only, so exact GELU never takes it.

``TRITON_SHAPES`` is empty: the kernel has not been measured against
Inductor's linear + pointwise on a GPU yet (``scripts/gpu_linear_act.py``),
and a kernel is chosen only where it was measured faster.
``KP_LINEAR_ACT_KERNEL=triton|reference`` forces one where it can run (for
benchmarks); any other value is an error. The backward is the ops' own
autograd formula in both cases (ATen GEMMs and ``act_backward``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..core.devices import DeviceInfo, describe
from ..ops import linear_act as ops

IMPLEMENTATIONS = ("cublaslt", "triton", "reference")
# (K, N) measured faster through cuBLASLt's epilogue than Inductor's own path, per (device capability, activation)
EPILOGUE_SHAPES: dict = {((9, 0), "gelu_tanh"): {(4096, 16384)}}
EPILOGUE_ACTIVATIONS = {"gelu_tanh": True, "relu": False}  # activation -> use_gelu
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# (K, N) measured faster through the Triton kernel than Inductor's own path, per (device capability, gated)
TRITON_SHAPES: dict = {}


def _forced() -> str:
    forced = os.environ.get("KP_LINEAR_ACT_KERNEL", "")
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"KP_LINEAR_ACT_KERNEL={forced!r} is not one of {IMPLEMENTATIONS}")
    return forced


def choose(device: DeviceInfo, dtype: torch.dtype, k: int, n: int, gated: bool, readable: bool,
           triton: bool = _HAS_TRITON, epilogue: "str | None" = None) -> str:
    """``"cublaslt"`` for an ungated op without stored pre-activations whose activation cuBLASLt applies
    (``epilogue``: that activation, else None) where measured faster at ``(k, n)``; ``"triton"`` where the
    kernel can read the operands and was measured faster; either where ``KP_LINEAR_ACT_KERNEL`` forces it and
    it can run; else ``"reference"``."""
    cuda = device.kind == "cuda" and device.capability is not None and dtype in (torch.bfloat16, torch.float16)
    can = {"cublaslt": cuda and not gated and epilogue in EPILOGUE_ACTIVATIONS,
           "triton": cuda and triton and readable and device.capability >= (8, 0)}
    forced = _forced()
    if forced:
        return forced if can.get(forced) else "reference"
    if can["cublaslt"] and (k, n) in EPILOGUE_SHAPES.get((device.capability, epilogue), ()):
        return "cublaslt"
    measured = (k, n) in TRITON_SHAPES.get((device.capability, gated), ())
    return "triton" if can["triton"] and measured else "reference"


_device_info = functools.lru_cache(maxsize=None)(describe)


def _run(x, w_gate, w_up, b_gate, b_up, activation, store_pre):
    """``(out, gate pre-activation or None, up pre-activation or None)`` through the table's choice."""
    readable = False
    if _HAS_TRITON:
        from ..ops import triton_linear_act
        readable = triton_linear_act.supported(x, *[w for w in (w_gate, w_up) if w is not None])
    epilogue = activation if not store_pre and _bias_ok(x, b_up) else None
    impl = choose(_device_info(x.device), x.dtype, x.shape[-1], w_up.shape[0], w_gate is not None, readable,
                  epilogue=epilogue)
    with torch.no_grad():
        if impl == "cublaslt":
            return _epilogue(x, w_up, b_up, activation), None, None
        if impl == "triton":
            return triton_linear_act.forward(x, w_gate, w_up, b_gate, b_up, activation, store_pre)
        return ops.reference(x, w_gate, w_up, b_gate, b_up, activation)


def _bias_ok(x, b) -> bool:
    return b is None or (b.dim() == 1 and b.is_contiguous() and b.dtype == x.dtype)


def _epilogue(x, w, b, activation):
    """``act(x @ w.T + b)`` as one cuBLASLt GEMM with the bias and activation in its epilogue (a zero bias
    where there is none: the epilogue path needs one)."""
    n = w.shape[0]
    bias = b if b is not None else x.new_zeros(n)
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), w.t(),
                                  use_gelu=EPILOGUE_ACTIVATIONS[activation])
    return out.view(*x.shape[:-1], n)


def _linear_act(x, w, b, activation):
    ops._check("linear_act", x, (w,), (b,), activation)
    return _run(x, None, w, None, b, activation, False)[0]


def _linear_act_train(x, w, b, activation):
    ops._check("linear_act_train", x, (w,), (b,), activation)
    out, _, z = _run(x, None, w, None, b, activation, True)
    return out, z


def _gated_linear(x, w_gate, w_up, b_gate, b_up, activation):
    ops._check("gated_linear", x, (w_gate, w_up), (b_gate, b_up), activation)
    return _run(x, w_gate, w_up, b_gate, b_up, activation, False)[0]


def _gated_linear_train(x, w_gate, w_up, b_gate, b_up, activation):
    ops._check("gated_linear_train", x, (w_gate, w_up), (b_gate, b_up), activation)
    return _run(x, w_gate, w_up, b_gate, b_up, activation, True)


IMPLS = {"linear_act": _linear_act, "linear_act_train": _linear_act_train, "gated_linear": _gated_linear,
         "gated_linear_train": _gated_linear_train}
for _name, _fn in IMPLS.items():
    torch.library.register_kernel(f"kp::{_name}", "cuda", _fn)
