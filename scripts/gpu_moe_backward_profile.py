"""Where the routed-experts backward (``grouped_experts.backward``) spends its GPU time at E=8 top-2.

Diagnostics for issue 6 (the E=8 forward+backward case is no faster than Inductor's loop):
CUDA kernel times over 5 calls, and the backward's time with list-form and with stacked weights.
    PYTHONPATH=. python scripts/gpu_moe_backward_profile.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

from kp_compiler.ops import grouped_experts

T, d, f, E, k = 8192, 2048, 5632, 8, 2
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
w, ids = torch.topk(torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1), k)
w = (w / w.sum(-1, keepdim=True)).bfloat16()
mk = lambda r, c: [(torch.randn(r, c, device="cuda", generator=g) / c ** 0.5).bfloat16() for _ in range(E)]
G, U, D = mk(f, d), mk(f, d), mk(d, f)
grad = torch.randn_like(x)


def ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


flops = 2 * T * k * 3 * d * f
stacked = [torch.stack(G)], [torch.stack(U)], [torch.stack(D)]
t_list = ms(lambda: grouped_experts.backward(grad, x, ids, w, G, U, D, "silu"))
t_stacked = ms(lambda: grouped_experts.backward(grad, x, ids, w, *stacked, "silu"))
t_fwd = ms(lambda: grouped_experts.forward(x, ids, w, G, U, D, "silu"))
print(f"backward, list weights {t_list:.3f} ms ({2 * flops / t_list / 1e9:.0f} TFLOP/s of the 2x-forward work), "
      f"stacked weights {t_stacked:.3f} ms; grouped_mm forward {t_fwd:.3f} ms")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        grouped_experts.backward(grad, x, ids, w, G, U, D, "silu")
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
