"""Where a compiled FP8 SwiGLU MLP (8192 tokens, 4096 -> 14336 -> 4096, bf16) spends its GPU time.

Diagnostics for issue 7 (speed claims come from ``python -m bench``): CUDA kernel
times over 3 forward+backward calls, with ``options={"fp8": True}``.
    PYTHONPATH=. python scripts/gpu_fp8_profile.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

import kp_compiler  # noqa: F401
from kp_compiler.testing.models import SwiGLU

torch.manual_seed(0)
model = SwiGLU(4096, 14336).cuda().bfloat16()
x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
fn = torch.compile(model, backend="kernelpytorch", options={"fp8": True})
for _ in range(3):
    fn(x).float().square().mean().backward()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
    for _ in range(3):
        fn(x).float().square().mean().backward()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=80))
# the ATen ops behind them, by input shape (which op launched each elementwise kernel)
print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=40,
                                                         max_name_column_width=40, max_shapes_column_width=70))
