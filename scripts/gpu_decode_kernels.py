"""Where the decode sequence's GPU time goes under CUDA graphs, and how fast cuBLAS reads the linears' weights
(issue 18: buckets need the graphs' GPU time down to reach 3x Inductor default).

1. The decode model's linears alone (d=2048 Llama: q/o 2048x2048, k/v 512x2048, gate/up 5632x2048,
   down 2048x5632, head 32000x2048) at 1 to 64 rows through cuBLAS (``F.linear``). GPU time per call from a
   CUDA graph of calls over enough weight copies that none is in L2, so each call reads its weight from memory
   as in the model. (At ce01986 it also timed a few-row Triton kernel without a split over K: 0.75-1.20x of
   cuBLAS, below it at most sizes, so it was removed; ``bench/results/2026-12-02-h200-decode-kernels-ce01986.txt``.)
2. ``kp::multi_linear``'s one launch over the q, k, v (or gate, up) weights against one cuBLAS GEMM each.
3. The model compiled with ``mode="reduce-overhead"`` (Inductor, kernelpytorch) at batch 1, 13 and 40:
   the profiler's kernels per call, GPU time per call, and the share in GEMMs.

    PYTHONPATH=. python scripts/gpu_decode_kernels.py [linears|groups|model|all]
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


SHAPES = {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (5632, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}
ROWS = (1, 3, 8, 13, 16, 24, 32, 40, 64)


def graph_time_us(fn_per_copy, copies: int, replays: int = 10) -> float:
    """GPU microseconds per call: one CUDA graph of ``copies`` calls (one per weight copy), replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn_per_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn_per_copy(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * copies)


def linears() -> None:
    print("shape, rows: cuBLAS us (GB/s)")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, min(64, (256 << 20) // nbytes + 1))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = graph_time_us(lambda i: F.linear(x, ws[i]), copies)
            print(f"{name} {n}x{k}, {m} rows: {us:.2f} ({nbytes / (us * 1e3):.0f})", flush=True)


GROUPS = {"qkv d=2048": (2048, (2048, 512, 512)), "gate/up d=2048": (2048, (5632, 5632)),
          "qkv d=4096": (4096, (4096, 1024, 1024)), "qkv d=1024": (1024, (1024, 256, 256))}


def groups() -> None:
    """``kp::multi_linear``'s kernel against one cuBLAS GEMM per weight, GPU time in CUDA graphs."""
    from kp_compiler.ops import triton_multi_linear
    print("group, rows: cuBLAS per weight us | one launch us [config] | ratio | rel. error vs fp32")
    for name, (k, sizes) in GROUPS.items():
        nbytes = sum(sizes) * k * 2
        copies = max(2, min(64, (256 << 20) // nbytes + 1))
        sets = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for n in sizes]
                for _ in range(copies)]
        for m in (1, 4, 13, 16, 32, 40, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ys = [torch.empty(m, sum(sizes), device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            cublas = graph_time_us(lambda i: [F.linear(x, w) for w in sets[i]], copies)
            triton_multi_linear.run(x, sets[0], ys[0])  # tunes on first use (outside the capture)
            ours = graph_time_us(lambda i: triton_multi_linear.run(x, sets[i], ys[i]), copies)
            ref = torch.cat([F.linear(x.float(), w.float()) for w in sets[0]], -1)
            triton_multi_linear.run(x, sets[0], ys[0])
            err = ((ys[0].float() - ref).norm() / ref.norm()).item()
            key = (16 if m <= 16 else 32 if m <= 32 else 64, sizes, k, x.dtype, x.device.index)
            print(f"{name}, {m} rows: {cublas:.2f} | {ours:.2f} {list(triton_multi_linear._best.get(key, ()))} | "
                  f"{cublas / ours:.2f}x | {err:.1e}", flush=True)


def model() -> None:
    from kp_compiler.testing import hf
    m, vocab = hf.build("llama", "decode", attn="sdpa")
    m = m.cuda().to(torch.bfloat16)
    for backend in ("inductor", "kernelpytorch"):
        torch._dynamo.reset()
        f = torch.compile(m, backend=backend, mode="reduce-overhead") if backend == "inductor" else \
            torch.compile(m, backend=backend, options={"mode": "reduce-overhead"})
        for b in (1, 13, 40):
            ids = torch.randint(0, vocab, (b, 1), device="cuda")
            with torch.no_grad():
                for _ in range(4):
                    f(ids)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        f(ids)
                    torch.cuda.synchronize()
            rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in rows) / 5
            gemm = sum(e.self_device_time_total for e in rows
                       if any(s in e.key.lower() for s in ("gemm", "gemv", "nvjet", "sm90", "cutlass", "splitk"))) / 5
            count = sum(e.count for e in rows) / 5
            print(f"== {backend} reduce-overhead bs={b}: GPU {total / 1000:.3f} ms per call, {count:.0f} kernels, "
                  f"GEMM-named kernels {gemm / 1000:.3f} ms", flush=True)
            for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:14]:
                print(f"   {e.self_device_time_total / 5:9.1f} us  x{e.count // 5:<4} {e.key[:110]}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    print(torch.__version__, torch.cuda.get_device_name())
    if what in ("linears", "all"):
        linears()
    if what in ("groups", "all"):
        groups()
    if what in ("model", "all"):
        model()
