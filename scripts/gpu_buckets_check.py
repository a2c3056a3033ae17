"""Issue 18 check on the GPU: ``options["cudagraph_buckets"]`` on transformers' Llama at decode (T=1).

Compiles the decode-size Llama (sdpa, bf16) with ``mode="reduce-overhead"`` and buckets ``pow2:64``, calls it
at batch sizes 1, 3, 8, 13, 24, 40 (and 3 again), and prints per graph what the report says about buckets
(the sizes, or why not), the logits' error against eager per size, and the peak memory. Then ``explain`` on
the GPU: with buckets (the runtime's counts and the pool's memory) and in default mode (host time against GPU
time). Not a benchmark (``python -m bench.decode`` times it).
    PYTHONPATH=. python scripts/gpu_buckets_check.py
"""

from __future__ import annotations

import torch

from kp_compiler import explain
from kp_compiler.core.report import collect
from kp_compiler.testing import hf
from kp_compiler.testing.compare import rel_error

torch.manual_seed(0)
model, vocab = hf.build("llama", "decode", attn="sdpa")
model = model.cuda().bfloat16().eval()
compiled = torch.compile(model, backend="kernelpytorch",
                         options={"mode": "reduce-overhead", "cudagraph_buckets": "pow2:64"})
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
torch.cuda.reset_peak_memory_stats()
with collect() as records, torch.no_grad():
    for b in (1, 3, 8, 13, 24, 40, 3):
        ids = torch.randint(0, vocab, (b, 1), device="cuda")
        got = compiled(ids).logits.float()
        want = model(ids).logits.float()
        print(f"batch {b:3d}: logits rel. error vs eager {rel_error([got], [want]):.2e}", flush=True)
for r in records:
    print(f"graph {r.id}: lowering {r.lowering}, buckets {r.buckets}", flush=True)
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

with torch.no_grad():
    ids = torch.randint(0, vocab, (13, 1), device="cuda")
    torch._dynamo.mark_dynamic(ids, 0)
    print(explain(model, ids, mode="reduce-overhead", cudagraph_buckets="pow2:64"), flush=True)
    print(explain(model, ids), flush=True)
