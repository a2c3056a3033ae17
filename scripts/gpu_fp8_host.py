"""Whether the FP8 training cases are host-bound, by backend (issue 19 diagnostics, not a benchmark).

    PYTHONPATH=. python scripts/gpu_fp8_host.py [--case mlp|llama ...] [--backends ...] [--rows N]

For each case (``bench/cases/fp8.py``: the SwiGLU MLP forward+backward, the
2-layer Llama-8B-dims step, each with the harness's fused AdamW step) and
backend (the harness's rows, ``options["fp8"]`` for kernelpytorch, torchao
from ``.whl/``): the synchronized wall time per step (median of 20), the host
time to queue one step with the GPU drained first, and the GPU time per step
from the profiler's kernel sum. A step queued in about its wall time is
host-bound: the GPU waits for launches. Then cProfile's top rows by own time
for the kernelpytorch row, and its kp_compiler and torch.library frames by cumulative time. Speed claims come from ``python -m bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

import kp_compiler  # noqa: F401
from bench.backends import STANDARD
from bench.cases import Scale
from bench.cases.fp8 import _mlp, llama2_train
from bench.runner import Step
from bench.timing import wall_and_queued


def gpu_ms(fn, steps=3):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3


# rows beside the harness's backends: (backend, the case's kp options)
VARIANTS = {"kernelpytorch-inductor-casts": ("kernelpytorch", {"fp8": {"casts": "inductor"}}),
            "kernelpytorch-bf16": ("kernelpytorch", {"fp8": None})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs="*", default=["mlp", "llama"])
    ap.add_argument("--backends", nargs="*", default=["inductor", "kernelpytorch", "torchao-float8-tensorwise"])
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--profile", nargs="*", default=[], help="more rows to profile (kernelpytorch rows always are)")
    args = ap.parse_args()
    scale = Scale(device="cuda", dtype=torch.bfloat16, smoke=False)
    print(torch.__version__, torch.cuda.get_device_name())
    for case in args.case:
        for backend in args.backends:
            torch._dynamo.reset()
            wl = _mlp(scale, True) if case == "mlp" else llama2_train(scale)
            name, options = VARIANTS.get(backend, (backend, {"fp8": True}))
            fn = STANDARD[name].for_case(options).wrap(wl.model)
            step = Step(wl, wl.model, fn, True, "cuda")
            for _ in range(3):
                step()
            wall, queue = wall_and_queued(step)
            gpu = gpu_ms(step)
            print(f"=== {case} / {backend}: wall {wall:.3f} ms, queued {queue:.3f} ms, GPU kernels {gpu:.3f} ms per step",
                  flush=True)
            if backend.startswith("kernelpytorch") or backend in args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
                prof.disable()
                frames = "kp_compiler|_library|_ops|_functorch|output_code|eval_frame"
                for sort, filt in (("tottime", None), ("cumulative", frames)):
                    buf = io.StringIO()
                    stats = pstats.Stats(prof, stream=buf).sort_stats(sort)
                    stats.print_stats(filt, args.rows) if filt else stats.print_stats(args.rows)
                    text = buf.getvalue()
                    print(text[text.find("   ncalls"):].rstrip(), flush=True)
            del wl, fn, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
