"""Where a compiled transformers model spends its host time per call, by backend (diagnostics, not a benchmark).

    PYTHONPATH=. python scripts/gpu_host_profile.py MODEL [SIZE] [infer|train] [rows]

For Inductor, kernelpytorch as shipped and each ``--variant`` below: the synchronized wall time per call
(median of 20), the host time to queue one call with the GPU drained first (a call queued in more than
its GPU time is host-bound), then cProfile's top rows by own time and the kernelpytorch frames by
cumulative time. cProfile, unlike torch.profiler, leaves Triton's launch hooks unset, so ``Launcher``'s
fast path runs as it does for a user.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

import torch

from bench.timing import host_per_call, wall_and_queued
from kp_compiler.testing import hf

MODEL = sys.argv[1] if len(sys.argv) > 1 else "qwen3_moe"
SIZE = sys.argv[2] if len(sys.argv) > 2 else "suite"
KIND = sys.argv[3] if len(sys.argv) > 3 else "infer"
ROWS = int(sys.argv[4]) if len(sys.argv) > 4 else 25

VARIANTS = {  # besides Inductor and kernelpytorch as shipped
    "qwen3_moe": [("kernelpytorch keep", {"moe_grouped_mm": "keep"}),
                  ("kernelpytorch rewrite", {"moe_grouped_mm": "rewrite"})],
    "mixtral": [("kernelpytorch keep", {"moe_grouped_mm": "keep"})],
}


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return wall_and_queued(fn, reps)


def run(name, backend, options):
    torch._dynamo.reset()
    model, vocab = hf.build(MODEL, SIZE, attn=None, experts=None)
    model = model.cuda().bfloat16()
    ids = torch.randint(0, vocab, (4, 1024), device="cuda")
    if KIND == "train":
        model.train()
        step = torch.compile(lambda i: model(i, labels=i).loss, backend=backend, options=options)

        def call():
            step(ids).backward()
            model.zero_grad(set_to_none=True)
    else:
        fwd = torch.compile(model, backend=backend, options=options)

        def call():
            with torch.no_grad():
                fwd(ids)
    call()
    wall, queue = timed(call)
    back = host_per_call(call, reps=10)[1]  # wall per call, back to back
    print(f"\n=== {name} {KIND}: wall {wall:.3f} ms, queued {queue:.3f} ms, back to back {back:.3f} ms per call",
          flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    prof.disable()
    for sort, filt in (("tottime", None), ("cumulative", "kp_compiler")):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).sort_stats(sort)
        stats.print_stats(filt, ROWS) if filt else stats.print_stats(ROWS)
        text = buf.getvalue()
        print(text[text.find("   ncalls"):].rstrip())


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), MODEL, SIZE, KIND)
    for name, backend, options in [("inductor", "inductor", None), ("kernelpytorch", "kernelpytorch", None),
                                   *((n, "kernelpytorch", o) for n, o in VARIANTS.get(MODEL, []))]:
        try:
            run(name, backend, options)
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
