"""Issue 20 diagnostics on the GPU: ``kp::linear_cross_entropy`` (CUDA kernel: the Triton rows, or ATen's with
``KP_LCE_ROWS=aten``) against eager's linear + float + cross-entropy. Not a benchmark (speed claims come from
``python -m bench``):

1. numerics: loss and the gradients of ``h``, ``W`` (and ``b``) against fp64, beside eager's own error in the
   same dtype, for each option (ignore_index rows, smoothing, softcap, bias, sum), both rows implementations;
2. the chunk table: per chunk size and grad_w accumulation (``KP_LCE_ACCUMULATE``), the op's time (latency, medians) and peak memory above the inputs, at the
   two bench cases' LM-head shapes (4096 and 16384 tokens, d=1024, vocabulary 128256, bf16), beside eager's
   forward + backward.
    PYTHONPATH=. python scripts/gpu_lce_check.py
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bench.timing import time_fn
import kp_compiler.lowering  # noqa: F401  (registers the CUDA kernel)
from kp_compiler.ops.linear_cross_entropy import chunk_rows, rows_per_chunk

OPTIONS = [dict(), dict(smoothing=0.1), dict(softcap=30.0), dict(bias=True), dict(reduction="sum"),
           dict(smoothing=0.1, softcap=30.0, bias=True)]


def eager(h, w, b, labels, smoothing=0.0, softcap=0.0, reduction="mean"):
    z = F.linear(h, w, b)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z.float(), labels, ignore_index=-100, label_smoothing=smoothing, reduction=reduction)


def grads(loss_fn, params):
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return [loss.detach().double()] + [p.grad.double() for p in params]


def numerics(dtype, rows_impl):
    os.environ["KP_LCE_ROWS"] = rows_impl
    n, d, v = 1000, 256, 32000
    for opt in OPTIONS:
        g = torch.Generator(device="cuda").manual_seed(1)
        h = torch.randn(n, d, device="cuda", generator=g)
        w = torch.randn(v, d, device="cuda", generator=g) / d ** 0.5
        b = torch.randn(v, device="cuda", generator=g) if opt.get("bias") else None
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        labels[::7] = -100
        kw = dict(smoothing=opt.get("smoothing", 0.0), softcap=opt.get("softcap", 0.0),
                  reduction=opt.get("reduction", "mean"))
        ps64 = [t.double().requires_grad_() for t in (h, w, b) if t is not None]
        ps = [t.to(dtype).requires_grad_() for t in (h, w, b) if t is not None]
        ref = grads(lambda: eager(*ps64[:2], ps64[2] if b is not None else None, labels, **kw), ps64)
        mine = grads(lambda: torch.ops.kp.linear_cross_entropy(
            ps[0], ps[1], ps[2] if b is not None else None, labels, -100, kw["smoothing"], kw["reduction"],
            kw["softcap"], 256)[0], ps)
        theirs = grads(lambda: eager(ps[0], ps[1], ps[2] if b is not None else None, labels, **kw), ps)

        def err(xs):
            return " ".join(f"{(x - r).abs().max().item() / (r.abs().max().item() or 1):.1e}" for x, r in zip(xs, ref))
        print(f"  {rows_impl:6s} {str(dtype):15s} {str(opt):55s} kp [{err(mine)}]  eager [{err(theirs)}]", flush=True)
    os.environ.pop("KP_LCE_ROWS")


def table(n, d=1024, v=128256):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) / d ** 0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)

    def run(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30

        def step():
            h.grad = w.grad = None
            fn().backward()
        t = time_fn(step, "cuda", reps=10)
        return t.median_ms, peak
    rows = [("eager", None, lambda: eager(h, w, None, labels))]
    rows += [(f"kp {acc} rows {rows_per_chunk(n, c)}{' (table)' if c == chunk_rows(v) else ''}", acc,
              lambda c=c: torch.ops.kp.linear_cross_entropy(h, w, None, labels, -100, 0.0, "mean", 0.0, c)[0])
             for acc in ("weight", "fp32") for c in (256, 512, 1024, 2048, 4096) if rows_per_chunk(n, c) == c]
    for name, acc, fn in rows:
        os.environ["KP_LCE_ACCUMULATE"] = acc or "weight"
        ms, peak = run(fn)
        print(f"  N={n:6d} {name:30s} {ms:8.3f} ms  peak +{peak:.2f} GiB", flush=True)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    print("numerics: max error / max |fp64| for loss, grad h, grad W (, grad b)")
    for impl in ("triton", "aten"):
        for dtype in (torch.bfloat16, torch.float32):
            numerics(dtype, impl)
    print("chunk table (fwd + bwd, latency medians; peak above inputs)")
    for n in (4096, 16384):
        table(n)


if __name__ == "__main__":
    main()
