"""Issue 18 diagnosis on the GPU: where the buckets row's first pass spends its time and memory.

For each backend (Inductor ``reduce-overhead``, kernelpytorch with buckets ``pow2:64``), in a fresh process on
its own cache folder, cold then warm: the decode sequence's first calls (``bench.decode``'s order), each call's
wall seconds, GPU memory allocated after it and the peak during it (GiB), then per graph what kernelpytorch
compiled (ms) and its bucket counts. With ``--snapshot DIR`` the kernelpytorch child also writes the caching
allocator's history (``torch.cuda.memory._dump_snapshot``) for the peak's stack traces.
    PYTHONPATH=. python scripts/gpu_buckets_memory.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def child(backend: str, snapshot: str | None) -> None:
    from bench.decode import SIZES, _compile, _setup
    from kp_compiler.core.report import collect

    model, _, refs = _setup(False, "cuda")
    torch.cuda.synchronize()
    print(f"after setup: allocated {torch.cuda.memory_allocated() / 2**30:.3f} GiB", flush=True)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    start = time.perf_counter()
    f = _compile(model, backend, "reduce-overhead")
    with collect() as records, torch.no_grad():
        for b in SIZES:
            for style in ("pos", "kw"):
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                f(refs[b][0]) if style == "pos" else f(input_ids=refs[b][0])
                torch.cuda.synchronize()
                print(f"batch {b:3d} {style}: {time.perf_counter() - t0:7.2f} s  allocated "
                      f"{torch.cuda.memory_allocated() / 2**30:.3f}  peak {torch.cuda.max_memory_allocated() / 2**30:.3f}"
                      f"  reserved {torch.cuda.memory_reserved() / 2**30:.3f} GiB", flush=True)
    print(f"first pass {time.perf_counter() - start:.1f} s", flush=True)
    for r in records:
        print(f"graph {r.id}: compile {r.compile_ms:.0f} ms, buckets {r.buckets}", flush=True)
    if snapshot:
        torch.cuda.memory._dump_snapshot(os.path.join(snapshot, f"{backend}.pickle"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--child")
    ap.add_argument("--snapshot")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.snapshot)
        return
    os.makedirs(a.out, exist_ok=True)
    for backend in ("inductor", "kernelpytorch-buckets"):
        cache = tempfile.mkdtemp()
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        for state in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--child", backend]
            if state == "warm" and backend != "inductor":
                cmd += ["--snapshot", a.out]
            print(f"== {backend} {state}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
            print(proc.stdout, flush=True)
            if proc.returncode:
                print(proc.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
