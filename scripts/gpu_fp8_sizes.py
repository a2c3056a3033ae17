"""Where FP8 beats bf16 on this GPU: one linear per shape, inference and training, for the size table (issue 7).

For each ``(M, K, N)`` of a grid it times the GPU time of one call
(``bench.timing.time_fn`` with ``hide_launch``: the launch is queued behind a
sleep, so the eager op's host time, which a compiled graph does not pay
the same way, is left out):

- inference: ``F.linear`` in bf16 against ``kp::fp8_linear`` (tensorwise,
  weight quantized once and cached, as a ``torch.no_grad()`` graph runs it);
- training: forward and backward of ``F.linear`` against ``kp::fp8_linear_train``.

and prints one line per shape with both speedups (bf16 time / FP8 time).
Diagnostics for ``passes/fp8/linear.py``'s ``SIZE_TABLE``; the cases the issue names
are timed by ``python -m bench --groups fp8``.
    PYTHONPATH=. python scripts/gpu_fp8_sizes.py [--reps 20] [--json out.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F

import kp_compiler.passes.fp8.linear  # noqa: F401  (registers the ops and their CUDA kernels)
from bench.timing import time_fn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MS = (1024, 2048, 4096, 8192)
KNS = ((1024, 1024), (1024, 4096), (2048, 2048), (4096, 1024), (4096, 2048), (4096, 4096), (4096, 14336),
       (14336, 4096), (8192, 8192))


def timed(fn, reps):
    return time_fn(fn, "cuda", reps, hide_launch=True).median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; ms per call, speedup = bf16 / fp8")
    for k, n in KNS:
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16().requires_grad_()
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                bf16_inf = timed(lambda: F.linear(x, w), args.reps)
                fp8_inf = timed(lambda: torch.ops.kp.fp8_linear(x, w, None, "tensorwise", E4M3, E5M2, True), args.reps)

            def train_bf16():
                torch.autograd.grad(F.linear(x, w), [x, w], g)

            def train_fp8():
                torch.autograd.grad(torch.ops.kp.fp8_linear_train(x, w, None, E4M3, E5M2)[0], [x, w], g)

            bf16_tr, fp8_tr = timed(train_bf16, args.reps), timed(train_fp8, args.reps)
            row = dict(m=m, k=k, n=n, bf16_inference_ms=bf16_inf, fp8_inference_ms=fp8_inf,
                       bf16_training_ms=bf16_tr, fp8_training_ms=fp8_tr)
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d}  inference {bf16_inf:.4f} / {fp8_inf:.4f} = {bf16_inf / fp8_inf:.2f}x"
                  f"   training {bf16_tr:.4f} / {fp8_tr:.4f} = {bf16_tr / fp8_tr:.2f}x", flush=True)
            del x, g
        del w
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
