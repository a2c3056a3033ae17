"""Which implementation runs ``kp::routed_experts`` and its backward: a table over device, dtype and shapes.

Forward (``choose``):

| device | dtype | weights | implementation |
|---|---|---|---|
| CUDA 8.0 and up, Triton imports | bf16, fp16 | one shape and row stride per role | fused Triton kernels (``ops/triton_experts.py``) |
| CUDA 9.0 and up | bf16 | rows 16-byte aligned | ``torch._grouped_mm`` (``ops/grouped_experts.py``) |
| anything else (CPU, XLA, fp32) | | | the reference loop (``ops/routed_experts.py``) |

Backward (``choose_backward``): ``torch._grouped_mm`` on CUDA 9.0 and up in
bf16 with aligned rows, the per-expert reference elsewhere.

``kp::routed_experts_tables`` (inference graphs whose expert weights the pass put in address tables,
``ops/routed_experts_tables.py``) runs the Triton kernels on the tables, the table's other rows on the
weights behind them where Triton cannot run.

``kp::routed_experts_biased`` (experts with biases) takes the same table; the
Triton kernels add each expert's biases in their epilogues (1-D biases with
unit stride in ``x``'s dtype).

``kp::routed_experts_train`` (graphs with a backward, experts without biases) runs ``torch._grouped_mm``
where its backward does (``routed_experts_train.saves``: at most 16 experts), keeping the gate/up
pre-activations for it; with ``$KP_MOE_SAVE_TRITON=1`` it keeps them for more experts too, written by the
Triton forward's epilogue (no clear win on the H200: opt-in). Elsewhere it runs ``kp::routed_experts``'s forward and
its backward recomputes them.

``KP_MOE_KERNEL=triton|grouped_mm|reference`` forces one forward
implementation where it can run (for benchmarks and bisecting); anything
else there is an error, not a silent fallback. ``KP_MOE_BACKWARD`` does the
same for the backward; its ``triton`` (``ops/triton_expert_backward.py``:
weights read in place through the forward's address tables, about ten
launches) runs where the Triton forward can.
It is not the default: not yet measured on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..ops import grouped_experts, routed_experts, routed_experts_biased, routed_experts_tables, routed_experts_train
from ..core.devices import DeviceInfo, describe

IMPLEMENTATIONS = ("triton", "grouped_mm", "reference")
BACKWARD_IMPLEMENTATIONS = ("triton", "grouped_mm", "reference")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def choose(device: DeviceInfo, dtype: torch.dtype, aligned: bool, uniform: bool, triton: bool = True) -> str:
    """The forward implementation. ``uniform``: every expert weight of a role has one shape and stride."""
    cuda = device.kind == "cuda" and device.capability is not None
    if cuda and triton and uniform and device.capability >= (8, 0) and dtype in (torch.bfloat16, torch.float16):
        return "triton"
    if cuda and device.capability >= (9, 0) and dtype is torch.bfloat16 and aligned:
        return "grouped_mm"
    return "reference"


def choose_backward(device: DeviceInfo, dtype: torch.dtype, aligned: bool) -> str:
    """The backward implementation: ``"grouped_mm"`` or ``"reference"``."""
    cuda = device.kind == "cuda" and device.capability is not None
    if cuda and device.capability >= (9, 0) and dtype is torch.bfloat16 and aligned:
        return "grouped_mm"
    return "reference"


def fused_available(devices, dtypes) -> "str | None":
    """None if a fused implementation can run routed experts on ``devices`` in one of ``dtypes``;
    else why not (the backend then leaves ``moe-dispatch`` out of the default passes)."""
    fused = [d for d in devices if choose(d, torch.bfloat16, True, True, _HAS_TRITON) != "reference"]
    if not fused:
        kinds = ", ".join(sorted({d.kind for d in devices}))
        return (f"no fused routed-experts kernel on {kinds} (the op would run its reference loop); "
                "list 'moe-dispatch' in options['passes'] to rewrite anyway")
    if not dtypes & {torch.bfloat16, torch.float16}:
        return ("fused routed-experts kernels take bf16/fp16, the graph's inputs are "
                f"{sorted(str(t) for t in dtypes)}; list 'moe-dispatch' in options['passes'] to rewrite anyway")
    return None


_device_info = functools.lru_cache(maxsize=None)(describe)  # per call otherwise: CUDA property queries


def _forced() -> str:
    forced = os.environ.get("KP_MOE_KERNEL", "")
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"KP_MOE_KERNEL={forced!r} is not one of {IMPLEMENTATIONS}")
    return forced


def _cuda_forward(x, ids, weights, w_gate, w_up, w_down, activation):
    routed_experts._check(x, ids, weights, w_gate, w_up, w_down, activation)
    return _forward(x, ids, weights, w_gate, w_up, w_down, activation, routed_experts.NO_BIASES)


def _cuda_forward_biased(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    routed_experts_biased.check_biases(x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation)
    return _forward(x, ids, weights, w_gate, w_up, w_down, activation, (b_gate, b_up, b_down))


def _cuda_forward_tables(x, ids, weights, handle, activation):
    """``kp::routed_experts_tables``: the Triton kernels on the tables (the pass made them only where the
    kernels can read the weights); where this machine cannot run them, the reference on the weights."""
    entry = routed_experts_tables.entry(handle)
    if entry.readable and _HAS_TRITON and x.dtype in (torch.bfloat16, torch.float16) and _forced() in ("", "triton"):
        from ..ops import triton_experts
        with torch.no_grad():
            return triton_experts.run(x, ids, weights, entry.roles, entry.tables, activation)
    w_gate, w_up, w_down = entry.weights()
    return _forward(x, ids, weights, w_gate, w_up, w_down, activation, routed_experts.NO_BIASES)


def _forward(x, ids, weights, w_gate, w_up, w_down, activation, biases):
    """Both ops' CUDA forward: the table's implementation (Triton only where it can read every weight and bias)."""
    tables = _triton_tables(x, w_gate, w_up, w_down)  # a 3-D role is read in place, never unbound per call
    bias_tabs = None
    if tables is not None:
        from ..ops import triton_experts
        bias_tabs = triton_experts.bias_tables(x, biases)
    impl = _forced() or choose(_device_info(x.device), x.dtype, grouped_experts.aligned(x, w_up),
                               tables is not None and bias_tabs is not None, _HAS_TRITON)
    with torch.no_grad():
        if impl == "triton":
            from ..ops import triton_experts
            return triton_experts.forward(x, ids, weights, w_gate, w_up, w_down, activation, tables, biases, bias_tabs)
        if impl == "grouped_mm":
            return grouped_experts.forward(x, ids, weights, w_gate, w_up, w_down, activation, biases)
        return routed_experts.reference(x, ids, weights, w_gate, w_up, w_down, activation, biases)


def _cuda_forward_train(x, ids, weights, w_gate, w_up, w_down, activation):
    """``kp::routed_experts_train``: where it keeps the pre-activations (``routed_experts_train.saves``), the
    grouped_mm forward for at most ``SAVE_MAX_EXPERTS`` experts, else the Triton kernels writing them from
    their epilogue (``$KP_MOE_SAVE_TRITON=1``; grouped_mm where Triton cannot read the weights)."""
    if (routed_experts_train.saves(x, w_up) and routed_experts.num_experts(w_up) > routed_experts_train.SAVE_MAX_EXPERTS
            and _HAS_TRITON and _forced() in ("", "triton")):
        routed_experts._check(x, ids, weights, w_gate, w_up, w_down, activation)
        tables = _triton_tables(x, w_gate, w_up, w_down)
        if tables is not None:
            from ..ops import triton_experts
            with torch.no_grad():
                return triton_experts.forward(x, ids, weights, w_gate, w_up, w_down, activation, tables, save=True)
    return routed_experts_train.forward_impl(x, ids, weights, w_gate, w_up, w_down, activation)


def _forced_backward() -> str:
    forced = os.environ.get("KP_MOE_BACKWARD", "")
    if forced and forced not in BACKWARD_IMPLEMENTATIONS:
        raise ValueError(f"KP_MOE_BACKWARD={forced!r} is not one of {BACKWARD_IMPLEMENTATIONS}")
    return forced


def _cuda_backward(grad, x, ids, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    biases = (b_gate, b_up, b_down)
    forced = _forced_backward()
    if forced == "triton":
        tables = _triton_tables(x, w_gate, w_up, w_down)
        if tables is not None:
            from ..ops import triton_expert_backward
            return triton_expert_backward.backward(grad, x, ids, weights, w_gate, w_up, w_down, activation, tables,
                                                   biases)
    impl = choose_backward(_device_info(x.device), x.dtype, grouped_experts.aligned(x, w_up))
    if forced == "reference":
        impl = "reference"
    if impl == "grouped_mm":
        return grouped_experts.backward(grad.contiguous(), x, ids, weights, w_gate, w_up, w_down, activation, biases)
    return routed_experts.reference_backward(grad, x, ids, weights, w_gate, w_up, w_down, activation, biases)


def _triton_tables(x, w_gate, w_up, w_down):
    if not _HAS_TRITON or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    from ..ops import triton_experts
    return triton_experts.expert_tables(x, w_gate, w_up, w_down)


# Registered on the dispatcher's CUDA key directly rather than through ``register_kernel("cuda")``:
# that wrapper's per-call checks (outputs not aliasing the 3 x E weight inputs) cost about 0.26 ms of
# host time per call on an H100 host (torch 2.11, scripts/gpu_moe_overhead.py), more than a decode
# step's GPU time; these kernels return fresh tensors only (tests/lowering/test_moe_choice.py).
_CUDA = torch.library.Library("kp", "IMPL")
_CUDA.impl("routed_experts", _cuda_forward, "CUDA")
_CUDA.impl("routed_experts_backward", _cuda_backward, "CUDA")
_CUDA.impl("routed_experts_biased", _cuda_forward_biased, "CUDA")
_CUDA.impl("routed_experts_tables", _cuda_forward_tables, "CUDA")
_CUDA.impl("routed_experts_train", _cuda_forward_train, "CUDA")
_CUDA.impl("routed_experts_backward_saved", routed_experts_train.backward_impl, "CUDA")
