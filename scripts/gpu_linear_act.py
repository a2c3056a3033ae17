"""Issue 19 diagnostics: the Triton forward of ``kp::linear_act`` / ``kp::gated_linear`` (``ops/triton_linear_act.py``)
against Inductor's own linear + pointwise on the same code, before the kernel is wired to the ops. Not a
benchmark (speed claims come from ``python -m bench``): per shape, the error against fp32 beside eager bf16's,
then the GPU time per call (``bench.timing.time_fn`` with the launch hidden behind a sleep) and the latency (its
default timing), medians, of eager, Inductor, and the kernel (tuned on its first call).

Shapes: the issue's linear + GELU(tanh) 8192 x 4096 -> 16384; Llama-3-8B's SwiGLU gate/up 8192 x 4096 -> 14336,
with and without the pre-activations stored (training); a decode-size SwiGLU 16 x 4096 -> 14336.
    PYTHONPATH=. python scripts/gpu_linear_act.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.timing import time_fn
from kp_compiler.ops import triton_linear_act
from kp_compiler.ops.activations import ACTIVATIONS

CASES = [("linear+gelu_tanh", 8192, 4096, 16384, False, "gelu_tanh", False),
         ("swiglu", 8192, 4096, 14336, True, "silu", False),
         ("swiglu, pre-activations stored", 8192, 4096, 14336, True, "silu", True),
         ("swiglu decode", 16, 4096, 14336, True, "silu", False)]


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name, m, k, n, gated, act, store in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        wg = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16() if gated else None
        wu = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
        f = ACTIVATIONS[act]

        def eager(x, wg, wu):
            return f(F.linear(x, wg)) * F.linear(x, wu) if wg is not None else f(F.linear(x, wu))
        inductor = torch.compile(eager)
        kernel = lambda: triton_linear_act.forward(x, wg, wu, None, None, act, store_pre=store)  # noqa: E731
        exact = eager(x.float(), None if wg is None else wg.float(), wu.float())
        err = lambda out: ((out.float() - exact).norm() / exact.norm()).item()  # noqa: E731
        line = f"{name} {m}x{k}->{n}: rel. error kernel {err(kernel()[0]):.2e}, eager bf16 {err(eager(x, wg, wu)):.2e}"
        print(line, flush=True)
        for label, fn in (("eager", lambda: eager(x, wg, wu)), ("inductor", lambda: inductor(x, wg, wu)),
                          ("kernel", kernel)):
            lat = time_fn(fn, "cuda", 20)
            flops = 2 * m * k * n * (2 if gated else 1)
            ms = time_fn(fn, "cuda", 20, hide_launch=True).median_ms
            print(f"  {label:9s} GPU {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), latency median {lat.median_ms:.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
