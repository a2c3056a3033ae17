"""CUDA checks of kp::routed_experts' implementations (issue 6), printed as text.

For each anchor shape in bf16: the Triton forward, the grouped_mm forward and
the eager bf16 loop, each as relative L2 error vs the loop in fp32; the
grouped_mm backward's gradients vs the fp32 reference backward; an idle
expert's gradients; the tile configs the first call picked.
    PYTHONPATH=. python scripts/gpu_moe_check.py
"""

import torch

import kp_compiler.lowering.moe  # noqa: F401  (registers the CUDA kernels)
from kp_compiler.ops import grouped_experts, routed_experts, triton_experts

SHAPES = {"e64-top8": (4096, 2048, 768, 64, 8), "e64-top8-decode": (64, 2048, 768, 64, 8),
          "e8-top2": (8192, 2048, 5632, 8, 2), "idle-expert": (256, 256, 512, 8, 2)}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(T, d, f, E, k, idle):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    logits = torch.randn(T, E, device="cuda", generator=g)
    if idle:
        logits[:, -1] = -1e9
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    w = (w / w.sum(-1, keepdim=True)).bfloat16()
    mk = lambda r, c: [(torch.randn(r, c, device="cuda", generator=g) / c ** 0.5).bfloat16() for _ in range(E)]
    return x, ids, w, mk(f, d), mk(f, d), mk(d, f)


for name, (T, d, f, E, k) in SHAPES.items():
    x, ids, w, G, U, Dn = make(T, d, f, E, k, name == "idle-expert")
    f32 = lambda ts: [t.float() for t in ts]
    want = routed_experts.reference(x.float(), ids, w.float(), f32(G), f32(U), f32(Dn), "silu")
    eager = routed_experts.reference(x, ids, w, G, U, Dn, "silu")
    tri = triton_experts.forward(x, ids, w, G, U, Dn, "silu")
    grp = grouped_experts.forward(x, ids, w, G, U, Dn, "silu")
    print(f"{name}: forward rel-L2 vs fp32 loop: triton {rel(tri, want):.2e}  grouped_mm {rel(grp, want):.2e}  "
          f"eager bf16 loop {rel(eager, want):.2e}")
    grad = torch.randn_like(x)
    ref = routed_experts.reference_backward(grad.float(), x.float(), ids, w.float(), f32(G), f32(U), f32(Dn), "silu")
    got = grouped_experts.backward(grad, x, ids, w, G, U, Dn, "silu")
    eag = routed_experts.reference_backward(grad, x, ids, w, G, U, Dn, "silu")
    names = ("x", "weights", "gate", "up", "down")
    print(f"{name}: backward rel-L2 vs fp32: grouped_mm " + " ".join(f"{n} {rel(a, b):.2e}" for n, a, b in zip(names, got, ref))
          + " | eager bf16 " + " ".join(f"{n} {rel(a, b):.2e}" for n, a, b in zip(names, eag, ref)))
    if name == "idle-expert":
        print(f"idle expert grads all zero: {all(torch.count_nonzero(t[-1]) == 0 for t in got[2:5])}, "
              f"finite: {all(torch.isfinite(t).all().item() for t in got)}")
    # through the op, as the compiled graph calls it (the table picks the implementation)
    xr = x.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in G + U + Dn]
    out = torch.ops.kp.routed_experts(xr, ids, w, params[:E], params[E:2 * E], params[2 * E:], "silu")
    out.backward(grad)
    print(f"{name}: op forward rel-L2 {rel(out, want):.2e}, grad x rel-L2 {rel(xr.grad, ref[0]):.2e}")

# Expert biases: the Triton epilogues (and the biased op through the table) vs the fp32 loop with biases.
for name, (T, d, f, E, k) in (("biased-e64-top8-decode", (64, 2048, 768, 64, 8)), ("biased-e8-top2", (2048, 1024, 2816, 8, 2))):
    x, ids, w, G, U, Dn = make(T, d, f, E, k, False)
    bias = lambda n: [(torch.randn(n, device="cuda") * 0.1).bfloat16() for _ in range(E)]
    biases = (bias(f), bias(f), bias(d))
    f32 = lambda ts: [t.float() for t in ts]
    want = routed_experts.reference(x.float(), ids, w.float(), f32(G), f32(U), f32(Dn), "silu", tuple(f32(b) for b in biases))
    eager = routed_experts.reference(x, ids, w, G, U, Dn, "silu", biases)
    tri = triton_experts.forward(x, ids, w, G, U, Dn, "silu", None, biases)
    op = torch.ops.kp.routed_experts_biased(x, ids, w, G, U, Dn, *biases, "silu")
    print(f"{name}: forward rel-L2 vs fp32 loop: triton {rel(tri, want):.2e}  op {rel(op, want):.2e}  "
          f"eager bf16 loop {rel(eager, want):.2e}")


def ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


# Diagnostics only (speed claims come from `python -m bench`): the op's implementations alone.
for name, (T, d, f, E, k) in list(SHAPES.items())[:3]:
    x, ids, w, G, U, Dn = make(T, d, f, E, k, False)
    flops = 2 * T * k * 3 * d * f
    t_tri = ms(lambda: triton_experts.forward(x, ids, w, G, U, Dn, "silu"))
    t_grp = ms(lambda: grouped_experts.forward(x, ids, w, G, U, Dn, "silu"))
    grad = torch.randn_like(x)
    t_bwd = ms(lambda: grouped_experts.backward(grad, x, ids, w, G, U, Dn, "silu"))
    print(f"{name}: triton fwd {t_tri:.3f} ms ({flops / t_tri / 1e9:.0f} TFLOP/s), grouped_mm fwd {t_grp:.3f} ms, "
          f"grouped_mm bwd {t_bwd:.3f} ms ({2 * flops / t_bwd / 1e9:.0f} TFLOP/s)")
print("tile configs picked:", {k: v for k, v in triton_experts._best.items()})

# Where a call's GPU time goes: CUDA kernel times of one Triton forward at two shapes.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for name in ("e64-top8", "e64-top8-decode"):
    x, ids, w, G, U, Dn = make(*SHAPES[name], False)
    tables = triton_experts.expert_tables(x, [], U, Dn) and triton_experts.expert_tables(x, G, U, Dn)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            triton_experts.forward(x, ids, w, G, U, Dn, "silu", tables)
        torch.cuda.synchronize()
    print(f"--- {name}: CUDA kernels over 5 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
