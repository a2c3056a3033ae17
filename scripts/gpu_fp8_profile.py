"""Where a compiled FP8 case spends its GPU time, by kernel, beside Inductor bf16 (issue 7 diagnostics).

``--case mlp``: the SwiGLU MLP (8192 tokens, 4096 -> 14336 -> 4096, bf16)
forward+backward; ``--case llama``: the 2-layer Llama-8B-dims training step of
``bench/cases/fp8.py`` (forward, backward, fused AdamW). CUDA kernel times over
3 steps, each kernel put in a group (FP8 GEMM, bf16 GEMM, FP8 casts, attention,
optimizer, other), then the top kernels. Speed claims come from ``python -m bench``.
    PYTHONPATH=. python scripts/gpu_fp8_profile.py [--case mlp|llama] [--backends kernelpytorch inductor
        torchao-float8-tensorwise]

Backends are the harness's rows (``bench/backends.py``): ``kernelpytorch`` with ``options["fp8"]``, Inductor,
and torchao's float8 training rows (torchao from ``.whl/``), each on its own copy of the model.
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kp_compiler  # noqa: F401
from bench.backends import STANDARD
from bench.cases import Scale
from bench.cases.fp8 import _mlp, llama2_train

GROUPS = (("FP8 GEMM", ("qqtst", "qrtst", "f8", "e4m3", "e5m2")), ("FP8 casts", ("_amax", "_quantize", "to_fp8",
                                                                                   "float8", "clamp", "abs_max")),
          ("GEMM", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")), ("attention", ("flash", "fmha", "attention")),
          ("optimizer", ("adam",)), ("fill/copy", ("fill", "copy", "memset", "memcpy")))


def group(name: str) -> str:
    low = name.lower()
    for label, keys in GROUPS:
        if any(k in low for k in keys):
            return label
    return "other (elementwise, reductions)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="mlp", choices=("mlp", "llama"))
    ap.add_argument("--backends", nargs="*", default=["kernelpytorch", "inductor"])
    ap.add_argument("--rows", type=int, default=22)
    args = ap.parse_args()
    scale = Scale(device="cuda", dtype=torch.bfloat16, smoke=False)
    for backend in args.backends:
        torch._dynamo.reset()
        wl = _mlp(scale, True) if args.case == "mlp" else llama2_train(scale)
        model, (x,) = wl.model, wl.inputs
        fn = STANDARD[backend].for_case({"fp8": True}).wrap(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            wl.loss(fn(x)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        totals = defaultdict(float)
        for e in events:
            totals[group(e.key)] += e.self_device_time_total / 3 / 1e3
        print(f"== {args.case} / {backend}: GPU ms per step {sum(totals.values()):.3f}")
        for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {label:32s} {ms:8.3f} ms")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        del wl, model, x, fn, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
