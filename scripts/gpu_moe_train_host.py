"""Issue 17 diagnostics: why the rewritten Qwen3-MoE training step takes twice its GPU time in wall time.

The suite model's training step under kernelpytorch with the ``grouped_mm`` rewrite: one step under
``torch.cuda.set_sync_debug_mode("warn")`` (every host sync warns, with its stack), then torch.profiler's top
rows by self CPU time over 3 steps. Not a benchmark.
    PYTHONPATH=. python scripts/gpu_moe_train_host.py
"""

from __future__ import annotations

import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from kp_compiler.backend import kernelpytorch
from kp_compiler.testing import hf

torch.manual_seed(0)
model, vocab = hf.build("qwen3_moe", "suite", attn=None, experts=None)
model = model.cuda().bfloat16().train()
tokens = torch.randint(0, vocab, (4, 1024), device="cuda")
loss = torch.compile(lambda i: model(i, labels=i).loss, backend=kernelpytorch, options={"moe_grouped_mm": "rewrite"})


def step():
    loss(tokens).backward()
    model.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
seen = set()


def show(message, category, filename, lineno, file=None, line=None):
    where = "".join(traceback.format_stack(limit=14)[:-2])
    if (filename, lineno, where) in seen:
        return
    seen.add((filename, lineno, where))
    print(f"SYNC: {message}\n{where}", flush=True)


warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode("warn")
step()
torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
print(f"{len(seen)} distinct sync sites", flush=True)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
