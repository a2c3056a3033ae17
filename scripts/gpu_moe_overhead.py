"""Host (CPU) time per call of the routed-experts op and of a compiled LoopMoE on CUDA (issue 6 diagnostics).

For each shape: the op alone (Triton path) with the ATen and the one-launch
Triton schedule, the compiled layer with and without Inductor's per-input size
asserts, each as host time per call (enqueue) and synchronized wall time per
call, then cProfile's top rows for the op and for the compiled call.
Diagnostics, not a benchmark (speed claims come from ``python -m bench``).
    PYTHONPATH=. python scripts/gpu_moe_overhead.py [--profile]
"""

import cProfile
import functools
import pstats
import sys

import torch
import torch._dynamo

from bench.timing import host_per_call
import kp_compiler  # noqa: F401
import kp_compiler.lowering.moe  # noqa: F401  (registers the CUDA kernels)
from kp_compiler.ops import expert_routing, triton_experts, triton_routing
from kp_compiler.testing.models import LoopMoE

torch._dynamo.config.capture_dynamic_output_shape_ops = True
SHAPES = {"e64-top8": (4096, 2048, 768, 64, 8), "e64-top8-decode": (64, 2048, 768, 64, 8),
          "e8-top2": (8192, 2048, 5632, 8, 2)}
PROFILE = "--profile" in sys.argv


per_call = functools.partial(host_per_call, reps=50)


def top(fn, rows=18, reps=50):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


for name, (T, d, f, E, k) in SHAPES.items():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LoopMoE(d, f, E, k).cuda().bfloat16()
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        probs = torch.softmax(model.router(x).float(), -1)
        w, ids = torch.topk(probs, k)
        w = (w / w.sum(-1, keepdim=True)).bfloat16()
        G = [m.gate.weight for m in model.experts]
        U = [m.up.weight for m in model.experts]
        D = [m.down.weight for m in model.experts]
        block = triton_experts.block_rows(T * k, E)
        a, b = expert_routing.schedule(ids, E, block), triton_routing.schedule(ids, E, block)
        same = torch.equal(a.rows, b.rows) and torch.equal(a.block_expert, b.block_expert)
        ha, wa = per_call(lambda: expert_routing.schedule(ids, E, block))
        hb, wb = per_call(lambda: triton_routing.schedule(ids, E, block))
        print(f"{name}: schedule equal {same}; ATen {ha:.3f} host / {wa:.3f} wall ms, "
              f"Triton {hb:.3f} host / {wb:.3f} wall ms")

        def op():
            return torch.ops.kp.routed_experts(x, ids, w, G, U, D, "silu")

        ref = op()
        h, wl = per_call(op)
        print(f"{name}: op (Triton schedule) {h:.3f} host / {wl:.3f} wall ms")
        triton_experts.schedule = expert_routing.schedule
        h2, w2 = per_call(op)
        err = ((op().float() - ref.float()).norm() / ref.float().norm()).item()
        triton_experts.schedule = triton_routing.schedule
        print(f"{name}: op (ATen schedule)   {h2:.3f} host / {w2:.3f} wall ms; outputs differ by {err:.1e}")
        h4, w4 = per_call(lambda: kp_compiler.lowering.moe._cuda_forward(x, ids, w, G, U, D, "silu"))
        print(f"{name}: the CUDA kernel function called directly {h4:.3f} host / {w4:.3f} wall ms")
        h3, w3 = per_call(lambda: triton_experts.forward(x, ids, w, G, U, D, "silu"))
        print(f"{name}: triton_experts.forward called directly {h3:.3f} host / {w3:.3f} wall ms")
        if PROFILE:
            top(op)
        for label, opts in (("size asserts on", {}), ("size asserts off", {"inductor_config": {"size_asserts": False}})):
            torch._dynamo.reset()
            fn = torch.compile(model, backend="kernelpytorch", options=opts)
            h, wl = per_call(lambda: fn(x))
            print(f"{name}: compiled, {label}: {h:.3f} host / {wl:.3f} wall ms")
        if PROFILE:
            top(lambda: fn(x), rows=30)
