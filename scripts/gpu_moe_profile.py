"""Where a compiled LoopMoE forward (E=64 top-8, T=4096 and T=64, bf16) spends its time on CUDA.

Prints the wall time per call (synchronized), then torch.profiler's top CPU and CUDA
rows over 5 calls. Diagnostics for issue 6, not a benchmark.
    PYTHONPATH=. python scripts/gpu_moe_profile.py
"""

import time

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

import kp_compiler  # noqa: F401
from kp_compiler.testing.models import LoopMoE

torch._dynamo.config.capture_dynamic_output_shape_ops = True
for T in (4096, 64):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LoopMoE(2048, 768, 64, 8).cuda().bfloat16()
    x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fn = torch.compile(model, backend="kernelpytorch")
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn(x)
        cpu = (time.perf_counter() - start) / 20
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 20
        print(f"T={T}: {cpu * 1e3:.3f} ms CPU per call (enqueue), {wall * 1e3:.3f} ms per call synchronized")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(x)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=55))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=55))
