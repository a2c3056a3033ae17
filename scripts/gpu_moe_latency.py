"""Issue 17 diagnostics: why the harness's latency of the compiled MoE decode layer (about 1.0 ms at ce5fd2c) is
above its back-to-back host time (about 0.57 ms, ``gpu_moe_overhead.py``). Per step, the kernelpytorch-compiled
layer: host and wall per call back to back, then ``bench.timing.time_fn`` latency (the harness's default
timing: L2 flush and a sync around each call), first alone in the process, then again after an Inductor
compile of the same module has run (as in the harness, where every backend of a case is compiled first).
Not a benchmark (speed claims come from ``python -m bench``).
    PYTHONPATH=. python scripts/gpu_moe_latency.py [T] [--kp-only]
"""

from __future__ import annotations

import sys
import time

import torch
import torch._dynamo

from bench.timing import host_per_call, time_fn
import kp_compiler  # noqa: F401
from kp_compiler.runtime import host_time
from kp_compiler.testing.models import LoopMoE

torch._dynamo.config.capture_dynamic_output_shape_ops = True


def report(label, fn):
    with torch.no_grad():
        h, w = host_per_call(fn, reps=50)
        lat = time_fn(fn, "cuda", 40).median_ms
        t = host_time.measure(fn)
    print(f"{label}: back to back host {h:.3f} / wall {w:.3f} ms; harness latency {lat:.3f} ms; "
          f"one call after a sync: host {t.host_ms:.3f}, wall {t.wall_ms:.3f}, GPU {t.gpu_ms} ms", flush=True)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    kp_only = "--kp-only" in sys.argv
    torch.manual_seed(0)
    model = LoopMoE(2048, 768, 64, 8).cuda().bfloat16()
    x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    kp = torch.compile(model, backend="kernelpytorch")
    with torch.no_grad():
        out, ref = kp(x), model(x)
        exact = model.float()(x.float())
        model.bfloat16()
    err = lambda t: ((t.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    print(f"T={T} rel. error vs fp32: kernelpytorch {err(out):.2e}, eager bf16 {err(ref):.2e}", flush=True)
    report(f"T={T} kernelpytorch alone", lambda: kp(x))
    if kp_only:
        return
    ind = torch.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        ind(x)
    print(f"inductor first call {time.perf_counter() - t0:.1f} s", flush=True)
    report(f"T={T} kernelpytorch after Inductor's compile", lambda: kp(x))
    report(f"T={T} inductor", lambda: ind(x))


if __name__ == "__main__":
    main()
