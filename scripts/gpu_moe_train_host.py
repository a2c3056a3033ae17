"""Issue 17 diagnostics: the rewritten Qwen3-MoE training step takes about twice its GPU time in wall time.

Run 1 (8287fc1, ``bench/results/2026-12-01-h200-moe-train-host.txt``): no host sync under
``torch.cuda.set_sync_debug_mode("warn")``; torch.profiler's CPU rows. This run: for Inductor and for
kernelpytorch with the ``grouped_mm`` rewrite, the step's wall time (synchronized, median of 10) against its
host time (until ``backward()`` returns, before the sync: the time the CPU needs to enqueue the step), then
cProfile's top rows by own time over 5 steps. Not a benchmark.
    PYTHONPATH=. python scripts/gpu_moe_train_host.py
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import torch

from kp_compiler.backend import kernelpytorch
from kp_compiler.testing import hf

torch.manual_seed(0)
model, vocab = hf.build("qwen3_moe", "suite", attn=None, experts=None)
model = model.cuda().bfloat16().train()
tokens = torch.randint(0, vocab, (4, 1024), device="cuda")

for name, backend, options in (("inductor", "inductor", None),
                               ("kernelpytorch rewrite", kernelpytorch, {"moe_grouped_mm": "rewrite"})):
    torch._dynamo.reset()
    loss = torch.compile(lambda i: model(i, labels=i).loss, backend=backend, options=options)

    def step():
        loss(tokens).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(10):
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
    print(f"{name}: wall {statistics.median(wall):.3f} ms/step, host {statistics.median(host):.3f} ms/step",
          flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
