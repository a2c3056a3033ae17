"""Probe FlashAttention-4 (``flash_attn.cute``, CuTe DSL) on the GPU: does it run, how fast, how exact.

    python scripts/gpu_fa4_probe.py

Causal (B=4 H=16 S=4096 D=128), the Mistral-suite window (B=2 H=16/4 S=4096
D=64, window 1024) and the same with Gemma2's softcap 50: FA4's
``flash_attn_func`` forward and forward+backward against SDPA (torch's own
pick) and compiled FlexAttention on the same inputs, with the output's
relative error against a float32 reference. Per-call synchronised medians:
diagnostics for the kernel table, not harness timings.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

DT = torch.bfloat16


def timed(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    t0 = time.perf_counter()
    from flash_attn.cute.interface import flash_attn_func
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    print(f"import flash_attn.cute: {time.perf_counter() - t0:.1f} s")

    for name, (B, H, KV, S, D, window, cap) in {
        "causal D=128": (4, 16, 16, 4096, 128, None, None),
        "window 1024 D=64 GQA": (2, 16, 4, 4096, 64, 1024, None),
        "window 1024 D=64 GQA softcap 50": (2, 16, 4, 4096, 64, 1024, 50.0),
    }.items():
        q = torch.randn(B, S, H, D, device="cuda", dtype=DT, requires_grad=True)  # FA layout [B, S, H, D]
        k = torch.randn(B, S, KV, D, device="cuda", dtype=DT, requires_grad=True)
        v = torch.randn(B, S, KV, D, device="cuda", dtype=DT, requires_grad=True)
        ws = (window - 1, 0) if window else (None, None)

        def fa4(q=q, k=k, v=v):
            out = flash_attn_func(q, k, v, causal=True, window_size=ws, softcap=cap or 0.0)
            return out[0] if isinstance(out, tuple) else out

        def mask_mod(b, h, qi, ki):
            keep = ki <= qi
            return keep & (qi - ki < window) if window else keep
        bm = create_block_mask(mask_mod, None, None, S, S, device="cuda")
        score_mod = (lambda s, b, h, qi, ki: torch.tanh(s / cap) * cap) if cap else None
        flex_c = torch.compile(flex_attention)

        def flex(q=q, k=k, v=v):
            return flex_c(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                          block_mask=bm, enable_gqa=KV != H).transpose(1, 2)

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=KV != H).transpose(1, 2)

        with torch.no_grad():  # float32 reference: dense scores on the first batch row
            qf, kf, vf = (t[:1].float().transpose(1, 2) for t in (q, k, v))
            kf, vf = (t.repeat_interleave(H // KV, dim=1) for t in (kf, vf))
            s = qf @ kf.transpose(-2, -1) * D ** -0.5
            if cap:
                s = torch.tanh(s / cap) * cap
            i, j = torch.arange(S, device="cuda")[:, None], torch.arange(S, device="cuda")[None, :]
            keep = (j <= i) & ((i - j < window) if window else True)
            ref = (s.masked_fill(~keep, float("-inf")).softmax(-1) @ vf).transpose(1, 2)
        print(f"\n== {name}: B={B} H={H}/{KV} S={S} D={D}")
        candidates = {"fa4": fa4, "flex": flex}
        if not window and not cap:
            candidates["sdpa"] = sdpa
        for label, fn in candidates.items():
            try:
                t1 = time.perf_counter()
                with torch.no_grad():
                    out = fn()
                torch.cuda.synchronize()
                first = time.perf_counter() - t1
                err = ((out[:1].float() - ref).norm() / ref.norm()).item()

                def step(fn=fn):
                    fn().float().square().mean().backward()
                    q.grad = k.grad = v.grad = None
                t1 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                first_bwd = time.perf_counter() - t1
                with torch.no_grad():
                    fwd = timed(fn)
                fb = timed(step)
                print(f"  {label:5s} fwd {fwd:7.3f} ms  fwd+bwd {fb:7.3f} ms  rel err {err:.2e}  "
                      f"(first fwd {first:.1f} s, first fwd+bwd {first_bwd:.1f} s)")
            except Exception as e:  # noqa: BLE001 (a kernel that cannot run here says why)
                print(f"  {label:5s} failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    main()
