"""Where transformers' Qwen3-MoE (suite size, default ``grouped_mm`` experts) spends its time, rewritten or not.

    PYTHONPATH=. python scripts/gpu_moe_hf_profile.py [budget_s]

Diagnostics for issue 17, not a benchmark (the harness in ``bench/`` is): per variant, synchronized wall time
per call (median of 20) for inference and a training step (forward with labels, backward), then
torch.profiler's top CUDA and CPU rows and the GPU time per call for Inductor and the rewritten
kernelpytorch graphs. Each timed row also prints the host time to queue one call (returned, not
synchronized): a call whose queue time is above its GPU time is host-bound. Variants: Inductor;
kernelpytorch as shipped (``moe_grouped_mm="auto"``: rewritten for inference, kept for training);
kernelpytorch with ``moe_grouped_mm="keep"`` and ``"rewrite"``.
"""

from __future__ import annotations

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


def queued(fn, reps=20):
    """Median host time to queue one call, the GPU left to drain between calls."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def variant(name, backend, options, train, prof=False):
    torch._dynamo.reset()
    model, vocab = build()
    ids = torch.randint(0, vocab, (4, 1024), device="cuda")
    if train:
        model.train()
        step = torch.compile(lambda i: model(i, labels=i).loss, backend=backend, options=options)

        def run():
            step(ids).backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()
        fwd = torch.compile(model, backend=backend, options=options)

        def run():
            with torch.no_grad():
                fwd(ids)
    t0 = time.time()
    run()
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    ms = timed(run)
    q = queued(run)
    print(f"{name:38s} {'train' if train else 'infer'}: {ms:8.3f} ms, queued in {q:.3f} ms"
          f"  (first call {compile_s:.1f} s)", flush=True)
    if prof:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in p.key_averages()) / 3 / 1e3
        print(f"  GPU time per call {gpu:.3f} ms")
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70))
    return ms


VARIANTS = [
    ("inductor", "inductor", None),
    ("kernelpytorch (keep)", "kernelpytorch", {"moe_grouped_mm": "keep"}),
    ("kernelpytorch (rewrite)", "kernelpytorch", {"moe_grouped_mm": "rewrite"}),
]

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    for train in (False, True):
        for name, backend, env in VARIANTS:
            if time.time() - START > BUDGET:
                print("budget spent; stopping")
                sys.exit(0)
            try:
                variant(name, backend, env, train, prof=name != "kernelpytorch (keep)")
            except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
                print(f"{name} {'train' if train else 'infer'}: failed: {type(e).__name__}: {str(e)[:300]}")
