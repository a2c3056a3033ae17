"""Issue 19 diagnostics: library paths a fused linear + activation could lower to, against Inductor's linear +
pointwise, at the bench shapes (bf16). Not a benchmark (speed claims come from ``python -m bench``).

- linear + bias + GELU(tanh), 8192 x 4096 -> 16384: ``torch._addmm_activation(use_gelu=True)`` (cuBLASLt's
  GELU_BIAS epilogue) and ``torch.addmm`` + GELU;
- SwiGLU gate/up 8192 x 4096 -> 14336: one GEMM over ``cat([w_gate, w_up])`` (packed once) then
  ``silu(g) * u`` compiled by Inductor, against Inductor's two GEMMs + fused pointwise;
- the whole SwiGLU MLP (down projection included) both ways.
Per row: error vs fp32, GPU time (launch hidden behind a sleep) and latency, medians.
    PYTHONPATH=. python scripts/gpu_linear_act_paths.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.timing import time_fn


def rows(name, exact, fns):
    print(name, flush=True)
    for label, fn in fns:
        out = fn()
        err = ((out.float() - exact).norm() / exact.norm()).item()
        gpu = time_fn(fn, "cuda", 20, hide_launch=True).median_ms
        lat = time_fn(fn, "cuda", 20).median_ms
        print(f"  {label:34s} err {err:.2e}  GPU {gpu:.3f} ms  latency {lat:.3f} ms", flush=True)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, n = 8192, 4096, 16384
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16()
    ref = lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    ind = torch.compile(ref)
    exact = ref(x.float(), w.float(), b.float())
    rows("linear+bias+gelu_tanh 8192x4096->16384", exact, [
        ("eager", lambda: ref(x, w, b)), ("inductor", lambda: ind(x, w, b)),
        ("_addmm_activation(use_gelu)", lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)),
        ("addmm then gelu", lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"))])
    w = b = exact = None  # free before the next shape
    d, f = 4096, 14336
    wg = (torch.randn(f, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    wu = (torch.randn(f, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    wd = (torch.randn(d, f, device="cuda", generator=g) / f ** 0.5).bfloat16()
    packed = torch.cat([wg, wu])
    gate_up = lambda x, wg, wu: F.silu(F.linear(x, wg)) * F.linear(x, wu)  # noqa: E731
    act = torch.compile(lambda h: F.silu(h[:, :f]) * h[:, f:])
    ind = torch.compile(gate_up)
    exact = gate_up(x.float(), wg.float(), wu.float())
    rows("swiglu gate/up 8192x4096->14336", exact, [
        ("eager", lambda: gate_up(x, wg, wu)), ("inductor", lambda: ind(x, wg, wu)),
        ("packed mm + inductor act", lambda: act(x @ packed.t()))])
    mlp = lambda x, wg, wu, wd: F.linear(gate_up(x, wg, wu), wd)  # noqa: E731
    ind_mlp = torch.compile(mlp)
    exact = mlp(x.float(), wg.float(), wu.float(), wd.float())
    rows("swiglu mlp 8192x4096->14336->4096", exact, [
        ("inductor", lambda: ind_mlp(x, wg, wu, wd)),
        ("packed mm + inductor act + mm", lambda: act(x @ packed.t()) @ wd.t())])


if __name__ == "__main__":
    main()
