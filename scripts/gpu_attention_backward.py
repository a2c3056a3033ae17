"""GPU diagnostics for issue 16's backward: where forward+backward attention time goes.

    python scripts/gpu_attention_backward.py [--part kernels|flex|profile|all]

kernels: causal fwd+bwd at the bench shape (B=4 H=16 S=4096 D=128 bf16) with
SDPA's backends forced one at a time, torch's own pick, and FlexAttention
(default options, then each kernel option alone). flex: the Mistral suite's
sliding window (B=2 H=16/4 S=4096 D=64, window 1024) fwd+bwd under kernel
options. profile: the top CUDA kernels of kernelpytorch's training step on the
suite models. Diagnostics for choosing kernels and options; speed claims come
from bench/, not from here.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

DT = torch.bfloat16


def timed(fn, reps=20, warmup=3):
    """Median ms of ``fn()`` (synchronised per call: what a caller waits)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def qkv(B, H, S, D, kv=None):
    kv = kv or H
    mk = lambda h: torch.randn(B, h, S, D, device="cuda", dtype=DT, requires_grad=True)
    return mk(H), mk(kv), mk(kv)


def step(attn, q, k, v):
    def run():
        out = attn(q, k, v)
        out.float().square().mean().backward()
        q.grad = k.grad = v.grad = None
    return run


def kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for B, H, S, D in ((4, 16, 4096, 128), (2, 16, 4096, 64)):
        q, k, v = qkv(B, H, S, D)
        print(f"\n== causal B={B} H={H} S={S} D={D} bf16: fwd ms / fwd+bwd ms")
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                if backend is None:
                    f = timed(lambda: sdpa(q, k, v))
                    fb = timed(step(sdpa, q, k, v))
                else:
                    with sdpa_kernel([backend]):
                        f = timed(lambda: sdpa(q, k, v))
                        fb = timed(step(sdpa, q, k, v))
                print(f"  sdpa {name:10s} {f:7.3f} {fb:7.3f}")
            except Exception as e:  # noqa: BLE001 (a backend that cannot run here says why)
                print(f"  sdpa {name:10s} failed: {type(e).__name__}: {str(e)[:120]}")
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device="cuda")
        options = [{}, {"ROWS_GUARANTEED_SAFE": True}, {"BLOCKS_ARE_CONTIGUOUS": True},
                   {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True, "PRESCALE_QK": True}]
        for opts in options:
            fx = torch.compile(lambda q, k, v, o=opts: flex_attention(q, k, v, block_mask=bm, kernel_options=o or None))
            try:
                print(f"  flex {opts}: {timed(lambda: fx(q, k, v)):7.3f} {timed(step(fx, q, k, v)):7.3f}")
            except Exception as e:  # noqa: BLE001
                print(f"  flex {opts} failed: {type(e).__name__}: {str(e)[:160]}")
        torch._dynamo.reset()


def flex_window():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, KV, S, D, W = 2, 16, 4, 4096, 64, 1024
    q, k, v = qkv(B, H, S, D, KV)
    bm = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), None, None, S, S, device="cuda")
    print(f"\n== window {W} B={B} H={H}/{KV} S={S} D={D}: fwd ms / fwd+bwd ms")
    options = [{}, {"ROWS_GUARANTEED_SAFE": True}, {"BLOCKS_ARE_CONTIGUOUS": True},
               {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64},
               {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32},
               {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64},
               {"bwd_num_warps": 8, "bwd_num_stages": 3},
               {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                "bwd_num_warps": 8, "bwd_num_stages": 2},
               {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
               {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
               {"USE_TMA": True}]
    for opts in options:
        fx = torch.compile(lambda q, k, v, o=opts: flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                                                  kernel_options=o or None))
        try:
            print(f"  flex {opts}: {timed(lambda: fx(q, k, v)):7.3f} {timed(step(fx, q, k, v)):7.3f}")
        except Exception as e:  # noqa: BLE001
            print(f"  flex {opts} failed: {type(e).__name__}: {str(e)[:160]}")
    for mode in ("max-autotune-no-cudagraphs",):
        fx = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, enable_gqa=True), mode=mode)
        try:
            print(f"  flex {mode}: {timed(lambda: fx(q, k, v)):7.3f} {timed(step(fx, q, k, v)):7.3f}")
        except Exception as e:  # noqa: BLE001
            print(f"  flex {mode} failed: {type(e).__name__}: {str(e)[:160]}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                print(f"  sdpa causal {name} (full S, for scale): {timed(lambda: sdpa(q, k, v)):7.3f} "
                      f"{timed(step(sdpa, q, k, v)):7.3f}")
        except Exception as e:  # noqa: BLE001
            print(f"  sdpa causal {name} failed: {type(e).__name__}: {str(e)[:120]}")
    torch._dynamo.reset()


def profile(names=("model-mistral-window-train", "model-gemma2-4096-train", "model-gemma2-4096-infer",
                   "attention-causal-fwd-bwd"), top=14):
    from torch.profiler import ProfilerActivity, profile as prof

    from bench.cases import Scale, load_all
    from bench.runner import Step

    cases = load_all()
    for name in names:
        case = cases[name]
        wl = case.build(Scale("cuda", DT, False))
        run = Step(wl, wl.model, torch.compile(wl.model, backend="kernelpytorch"), case.train, "cuda")
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        print(f"\n== {name}: kernelpytorch step {timed(run, reps=10):.3f} ms; top CUDA kernels over 5 steps")
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        rows = sorted(((e.key, e.device_time_total / 5e3, e.count // 5) for e in p.key_averages()),
                      key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        print(f"  GPU kernel time per step {total:.3f} ms")
        for key, ms, n in rows[:top]:
            print(f"  {ms:7.3f} ms  x{n:<4d} {key[:110]}")
        torch._dynamo.reset()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["kernels", "flex", "profile", "all"])
    ap.add_argument("--cases", nargs="*", help="bench cases to profile (default: the suite's attention models)")
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    part = args.part
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    if part in ("kernels", "all"):
        kernels()
    if part in ("flex", "all"):
        flex_window()
    if part in ("profile", "all"):
        profile(*([args.cases] if args.cases else []), top=args.top)
