"""Issue 20: the fused rows kernel (``ops/triton_cross_entropy.py``) over one chunk of the lce-128k step's logits
(1024 x 128256 bf16, the chunk ``chunk_rows`` picks), each tile by GPU time (``bench.timing.time_fn``, median
of 20 after warm-up), against the bytes it must move (the logits read twice, written once) and ATen's
``rows``. Picks the table in ``triton_cross_entropy.config``; not a benchmark of the step (``bash
bench/gpu_run.sh lce`` is). The committed sweeps (``bench/results/*lce-rows-sweep*``) timed with plain CUDA
events, without the harness's L2 flush.

    PYTHONPATH=. python scripts/gpu_lce_rows_sweep.py [rows] [vocab]
"""

from __future__ import annotations

import itertools
import sys

import torch

from bench.timing import time_fn
from kp_compiler.ops import linear_cross_entropy as lce
from kp_compiler.ops import triton_cross_entropy as tce


def gpu_ms(fn) -> float:
    """GPU time of ``fn`` (the harness's timer: L2 flushed, launch hidden behind a sleep), median of 20."""
    return time_fn(fn, "cuda", reps=20, hide_launch=True).median_ms


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 128256
    print(torch.__version__, torch.cuda.get_device_name(), f"rows {n} vocab {vocab} bf16", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, vocab, device="cuda", generator=g).mul_(3).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    scale = torch.tensor(1.0 / n, device="cuda")
    z, loss = base.clone(), torch.empty(n, device="cuda")
    want_loss, want_grad = lce.rows(base, labels, -100, 0.0, 0.0, scale)
    moved = 3 * base.numel() * base.element_size()
    print(f"ATen rows: {gpu_ms(lambda: lce.rows(base, labels, -100, 0.0, 0.0, scale)):.3f} ms; "
          f"the kernel must move {moved / 1e9:.2f} GB; current config {tce.config(vocab)}")
    results = []
    for block, warps, reverse in itertools.product((2048, 4096, 8192), (4, 8, 16), (False, True)):
        def run():
            z.copy_(base)  # timed with the copy; the copy alone is subtracted below
            tce.launch(z, labels, scale, loss, -100, 0.0, 0.0, block, warps, reverse)
        ms = gpu_ms(run)
        ok = torch.allclose(loss, want_loss, rtol=1e-4, atol=1e-4) and torch.allclose(
            z.float(), want_grad.float(), rtol=0, atol=2 ** -8)
        results.append((ms, block, warps, reverse, ok))
    copy = gpu_ms(lambda: z.copy_(base))
    print(f"copy alone {copy:.3f} ms (subtracted)")
    for ms, block, warps, reverse, ok in sorted(results):
        k = ms - copy
        print(f"  BLOCK {block:5d} warps {warps:2d} reverse {reverse!s:5s}: {k:.3f} ms, {moved / k / 1e6:7.0f} GB/s"
              f"{'' if ok else '  WRONG'}")


    correct = [r for r in results if r[-1]]
    if not correct:
        raise SystemExit("no tile gave the ATen rows' results")
    print("best KP_LCE_TILE=" + ",".join(str(int(v)) for v in min(correct)[1:4]))


if __name__ == "__main__":
    main()
