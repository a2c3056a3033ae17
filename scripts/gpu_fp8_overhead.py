"""Host (CPU) time per call of the compiled FP8 cases on CUDA, beside Inductor bf16 (issue 7 diagnostics).

For the 8192^3 linear (inference), the SwiGLU MLP forward+backward and the
2-layer Llama training step: host ms per call while enqueueing (no sync),
synchronized wall ms per call, then cProfile's top rows of kernelpytorch's
call. Diagnostics, not a benchmark (speed claims come from ``python -m bench``).
    PYTHONPATH=. python scripts/gpu_fp8_overhead.py [--profile] [--cases ops linear mlp llama]
"""

import argparse
import cProfile
import pstats

import torch
import torch._dynamo

import kp_compiler  # noqa: F401
from bench.cases import Scale
from bench.cases.fp8 import _linear, _mlp, llama2_train
from bench.timing import host_per_call


def step_fn(model, x, backend, train, options):
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    if not train:
        def run():
            with torch.no_grad():
                fn(x)
        return run

    def run():
        fn(x).float().square().mean().backward()
        x.grad = None
        for p in model.parameters():
            p.grad = None
    return run


def ops():
    """Host time per call of the pieces: the GEMMs, the casts, an allocation and a fill."""
    from kp_compiler.ops import triton_fp8

    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q, s = triton_fp8.quantize_dynamic(x, torch.float8_e4m3fn, False)
    pieces = {"torch._scaled_mm": lambda: torch._scaled_mm(q, q.t(), s, s, out_dtype=torch.bfloat16),
              "torch.mm (bf16)": lambda: torch.mm(x, x),
              "triton amax": lambda: triton_fp8.amax(x, False),
              "triton quantize_dynamic": lambda: triton_fp8.quantize_dynamic(x, torch.float8_e4m3fn, False),
              "triton quantize_pair": lambda: triton_fp8.quantize_pair(x, torch.float8_e4m3fn),
              "torch.zeros(())": lambda: torch.zeros((), device="cuda"),
              "torch.empty(4096, 4096)": lambda: torch.empty(4096, 4096, device="cuda")}
    for name, fn in pieces.items():
        h, w = host_per_call(fn, reps=200)
        print(f"op {name}: {h * 1e3:.1f} us host / {w * 1e3:.1f} us wall per call", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cases", nargs="*", default=["ops", "linear", "mlp", "llama"])
    args = ap.parse_args()
    if "ops" in args.cases:
        ops()
    scale = Scale(device="cuda", dtype=torch.bfloat16, smoke=False)
    builds = {"linear": (lambda: _linear(scale, 8192, 8192, 8192), False),
              "mlp": (lambda: _mlp(scale, True), True), "llama": (lambda: llama2_train(scale), True)}
    for name in [c for c in args.cases if c != "ops"]:
        build, train = builds[name]
        wl = build()
        model, (x,) = wl.model, wl.inputs
        for backend, options in (("inductor", None), ("kernelpytorch", {"fp8": True})):
            run = step_fn(model, x, backend, train, options)
            h, w = host_per_call(run)
            print(f"{name} {backend}: {h:.3f} host / {w:.3f} wall ms per call", flush=True)
            if args.profile and backend == "kernelpytorch":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(10):
                    run()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        del wl, model, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
