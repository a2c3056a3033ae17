"""Issue 17 diagnostics at the Qwen3-MoE suite layer (T=4096, d=1024, f=768, E=64, top-8, bf16, gate_up as
transformers keeps it): not a benchmark (speed claims come from ``python -m bench``).

1. The routed-experts backward (``grouped_experts.backward``: one elementwise pass, ``[gate | up]`` GEMMs)
   against the fp32 reference, beside the eager bf16 loop's own error; the previous backward
   (``scripts/moe_backward_before.py``, commit 3c7e78b) and the Triton one (``triton_expert_backward``) too,
   with their GPU time and host time per call.
2. GPU time per call (CUDA events, 20 calls) of the old and new backward; host and wall time per call of the
   op's forward (``host_per_call``), with the Launcher's fast-path count.
3. The op's forward as Triton and as grouped_mm (GPU time, TFLOP/s); cProfile of its host time at T=64.
4. transformers' Qwen3-MoE sparse block (router + ``grouped_mm`` experts) alone, then the suite model:
   Inductor vs kernelpytorch with the rewrite (and kept, for the block), inference and forward+backward:
   synchronized wall time (median of 20) and GPU kernel time by category (torch.profiler).
    PYTHONPATH=. python scripts/gpu_moe_layer_check.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kp_compiler.lowering.moe  # noqa: F401  (registers the CUDA kernels)
from bench.timing import host_per_call
from kp_compiler.ops import grouped_experts, triton_expert_backward, triton_experts, triton_routing
from kp_compiler.ops.routed_experts import reference, reference_backward
from kp_compiler.backend import kernelpytorch
from kp_compiler.testing import hf

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("before", pathlib.Path(__file__).with_name("moe_backward_before.py"))
before = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(before)

T, d, f, E, k = 4096, 1024, 768, 64, 8
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
w, ids = torch.topk(torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1), k)
w = (w / w.sum(-1, keepdim=True)).bfloat16()
gate_up = (torch.randn(E, 2 * f, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
down = (torch.randn(E, d, f, device="cuda", generator=g) / f ** 0.5).bfloat16()
roles = ([gate_up[:, :f]], [gate_up[:, f:]], [down])
grad = torch.randn(T, d, device="cuda", generator=g).bfloat16()
assert grouped_experts.side_by_side(*roles[:2]) is not None


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
wide = [[t.float()] for t in (gate_up[:, :f], gate_up[:, f:], down)]
exact = reference_backward(grad.float(), x.float(), ids, w.float(), *wide, "silu")
eager = reference_backward(grad, x, ids, w, *roles, "silu")
new = grouped_experts.backward(grad, x, ids, w, *roles, "silu")
old = before.backward(grad, x, ids, w, *roles, "silu")
names = ("x", "weights", "gate", "up", "down")
for name, n, o, e, r in zip(names, new, old, eager, exact):
    print(f"backward {name:8s} rel L2 vs fp32: new {rel(n, r):.2e}  before {rel(o, r):.2e}  eager bf16 {rel(e, r):.2e}"
          f"  finite {bool(torch.isfinite(n).all())}", flush=True)
out = torch.ops.kp.routed_experts(x, ids, w, *roles, "silu")
print(f"forward rel L2 vs fp32: {rel(out, reference(x.float(), ids, w.float(), *wide, 'silu')):.2e}", flush=True)


def gpu_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


tables = triton_experts.expert_tables(x, *roles)
tri = triton_expert_backward.backward(grad, x, ids, w, *roles, "silu", tables)
for name, t, r in zip(names, tri, exact):
    print(f"triton backward {name:8s} rel L2 vs fp32: {rel(t, r):.2e}", flush=True)
print(f"backward GPU ms/call: new {gpu_ms(lambda: grouped_experts.backward(grad, x, ids, w, *roles, 'silu')):.3f}"
      f"  before {gpu_ms(lambda: before.backward(grad, x, ids, w, *roles, 'silu')):.3f}"
      f"  triton {gpu_ms(lambda: triton_expert_backward.backward(grad, x, ids, w, *roles, 'silu', tables)):.3f}",
      flush=True)
for T2 in (4096, 64):  # host time per call of each backward (enqueue), at the layer and at decode size
    a2 = (grad[:T2], x[:T2], ids[:T2], w[:T2])
    hg, wg = host_per_call(lambda: grouped_experts.backward(*a2, *roles, "silu"), reps=30)
    ht, wt = host_per_call(lambda: triton_expert_backward.backward(*a2, *roles, "silu", tables), reps=30)
    print(f"backward T={T2}: grouped_mm host {hg:.3f} / wall {wg:.3f} ms, triton host {ht:.3f} / wall {wt:.3f} ms",
          flush=True)
print(f"forward GPU ms/call: {gpu_ms(lambda: torch.ops.kp.routed_experts(x, ids, w, *roles, 'silu')):.3f}")
for T2 in (4096, 64):
    x2, ids2, w2 = x[:T2], ids[:T2], w[:T2]
    host, wall = host_per_call(lambda: torch.ops.kp.routed_experts(x2, ids2, w2, *roles, "silu"), reps=50)
    print(f"forward T={T2}: host {host:.3f} ms/call, wall {wall:.3f} ms/call", flush=True)
print("launcher stats:", triton_experts._GATE_UP.stats, triton_experts._DOWN.stats, triton_routing._ROUTE.stats)


def wall_ms(fn, reps=20):
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


CATEGORIES = (("kp triton", ("_gate_up", "_down", "_route", "_grads")),
              ("grouped gemm", ("cutlass", "grouped")), ("gemm", ("nvjet", "gemm", "sm90_xmma", "cublas")),
              ("attention", ("attention", "flash", "fmha", "cudnn")), ("inductor triton", ("triton_",)))


def gpu_profile(fn, reps=5):
    """(GPU kernel ms per call, {category: ms per call}, top kernels) from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    cats, total, rows = {}, 0.0, []
    for e in p.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        ms = e.self_device_time_total / 1e3 / reps
        total += ms
        rows.append((ms, e.key[:60]))
        cat = next((c for c, keys in CATEGORIES if any(kw in e.key for kw in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    return total, cats, sorted(rows, reverse=True)[:8]


def report(label, fn):
    wall = wall_ms(fn)
    total, cats, top = gpu_profile(fn)
    split = ", ".join(f"{c} {ms:.2f}" for c, ms in sorted(cats.items(), key=lambda t: -t[1]))
    print(f"{label:48s} wall {wall:7.3f} ms  GPU {total:7.3f} ms  ({split})", flush=True)
    for ms, name in top:
        print(f"      {ms:7.3f} ms  {name}")


flops = 2 * T * k * d * 3 * f
for impl in ("triton", "grouped_mm"):
    os.environ["KP_MOE_KERNEL"] = impl
    ms = gpu_ms(lambda: torch.ops.kp.routed_experts(x, ids, w, *roles, "silu"))
    print(f"forward {impl:10s} GPU {ms:.3f} ms/call ({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
os.environ.pop("KP_MOE_KERNEL")
print("tuned tiles:", {key[0]: cfg for key, cfg in triton_experts._best.items()})

x64, ids64, w64 = x[:64], ids[:64], w[:64]
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    torch.ops.kp.routed_experts(x64, ids64, w64, *roles, "silu")
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)

torch.manual_seed(0)
model, vocab = hf.build("qwen3_moe", "suite", attn=None, experts=None)
model = model.cuda().bfloat16()
block = model.model.layers[0].mlp
hidden = torch.randn(4, 1024, d, device="cuda", dtype=torch.bfloat16)
VARIANTS = (("inductor", "inductor", None), ("kernelpytorch rewrite", kernelpytorch, {"moe_grouped_mm": "rewrite"}),
            ("kernelpytorch kept", kernelpytorch, None))
for name, backend, options in VARIANTS:
    torch._dynamo.reset()
    fn = torch.compile(block, backend=backend, options=options)
    with torch.no_grad():
        report(f"block {name} infer", lambda: fn(hidden))
    hidden_g = hidden.clone().requires_grad_()

    def step():
        out = fn(hidden_g)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
    report(f"block {name} fwd+bwd", step)

tokens = torch.randint(0, vocab, (4, 1024), device="cuda")
for name, backend, options in VARIANTS[:2]:
    torch._dynamo.reset()
    model.train()
    loss = torch.compile(lambda i: model(i, labels=i).loss, backend=backend, options=options)

    def train():
        loss(tokens).backward()
        model.zero_grad(set_to_none=True)
    report(f"model {name} train step", train)
    model.eval()
    fwd = torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        report(f"model {name} infer", lambda: fwd(tokens))
