"""Where transformers' Qwen3-MoE (suite size, default ``grouped_mm`` experts) spends its time, rewritten or not.

    PYTHONPATH=. python scripts/gpu_moe_hf_profile.py [budget_s]

Diagnostics for issue 17, not a benchmark (the harness in ``bench/`` is): per variant, synchronized wall time
per call (median of 20) for inference and a training step (forward with labels, backward), then
torch.profiler's top CUDA and CPU rows for the rewritten inference and training step. Variants:
Inductor; kernelpytorch as shipped (the form kept); kernelpytorch with the rewrite forced and each forward
implementation (``KP_MOE_KERNEL``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kp_compiler.testing import hf

BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 480
START = time.time()


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def build():
    torch.manual_seed(0)
    model, vocab = hf.build("qwen3_moe", "suite", attn=None, experts=None)
    return model.cuda().bfloat16(), vocab


def variant(name, backend, env, train, prof=False):
    for k in ("KP_MOE_REWRITE_GROUPED_MM", "KP_MOE_KERNEL"):
        os.environ.pop(k, None)
    os.environ.update(env)
    torch._dynamo.reset()
    model, vocab = build()
    ids = torch.randint(0, vocab, (4, 1024), device="cuda")
    if train:
        model.train()
        step = torch.compile(lambda i: model(i, labels=i).loss, backend=backend)

        def run():
            step(ids).backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()
        fwd = torch.compile(model, backend=backend)

        def run():
            with torch.no_grad():
                fwd(ids)
    t0 = time.time()
    run()
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    ms = timed(run)
    print(f"{name:38s} {'train' if train else 'infer'}: {ms:8.3f} ms  (first call {compile_s:.1f} s)", flush=True)
    if prof:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70))
    return ms


VARIANTS = [
    ("inductor", "inductor", {}),
    ("kernelpytorch (kept)", "kernelpytorch", {}),
    ("kernelpytorch rewrite, triton", "kernelpytorch", {"KP_MOE_REWRITE_GROUPED_MM": "1", "KP_MOE_KERNEL": "triton"}),
    ("kernelpytorch rewrite, grouped_mm", "kernelpytorch",
     {"KP_MOE_REWRITE_GROUPED_MM": "1", "KP_MOE_KERNEL": "grouped_mm"}),
]

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    for train in (False, True):
        for name, backend, env in VARIANTS:
            if time.time() - START > BUDGET:
                print("budget spent; stopping")
                sys.exit(0)
            try:
                variant(name, backend, env, train, prof=name.endswith("triton"))
            except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
                print(f"{name} {'train' if train else 'infer'}: failed: {type(e).__name__}: {str(e)[:300]}")
