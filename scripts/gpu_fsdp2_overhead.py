"""Where kernelpytorch's FSDP2 (or ``--config``'s) training step loses to Inductor's (H200, world size 1; issue 21).

``bench.distributed`` measured kernelpytorch at 0.88x Inductor under FSDP2 while it was 1.11x under DDP with the
same model. For each backend: the step's wall time, a profile's top host and GPU ops, and what the backend's
report says of each graph (lowering, guards, fallbacks).

    PYTHONPATH=. python scripts/gpu_fsdp2_overhead.py --out $OUT
    PYTHONPATH=. python scripts/gpu_fsdp2_overhead.py --config tp-hf --backends inductor kernelpytorch \
        'kernelpytorch:{"passes": ["noop-elimination"]}' --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--config", default="fsdp2")
    p.add_argument("--backends", nargs="+", default=["inductor", "kernelpytorch"])
    p.add_argument("--shape", default="issue")
    args = p.parse_args()
    from bench.distributed import SHAPES, build
    from kp_compiler.core.report import collect

    folder = tempfile.mkdtemp()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{folder}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))
    device = torch.device("cuda", 0)
    lines = []
    for backend in args.backends:
        shape = SHAPES[args.shape]
        if ":" in backend:  # "kernelpytorch:{json options}": the backend with these options
            import json
            model, opts, _ = build(args.config, "eager", shape, device, torch.bfloat16)
            step_fn = torch.compile(model, backend="kernelpytorch", options=json.loads(backend.split(":", 1)[1]))
        else:
            model, opts, step_fn = build(args.config, backend, shape, device, torch.bfloat16)
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)

        def step():
            loss = step_fn(ids)
            loss.backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        with collect() as records:
            for _ in range(8):
                step()
        torch.cuda.synchronize()
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        queued = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            queued.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        lines.append(f"## {args.config} {backend}: step {statistics.median(times):.3f} ms wall, "
                     f"{statistics.median(queued):.3f} ms to queue")
        for r in records:
            lines.append(f"graph {r.id}: lowering {r.lowering}, nodes {r.nodes_in}->{r.nodes_out}, "
                         f"passes {[(x.name, x.matches) for x in r.passes if x.matches]}, guards {r.guards}, "
                         f"fallbacks {r.fallbacks}, guards_added {r.guards_added}")
        import cProfile
        import io
        import pstats
        prof_py = cProfile.Profile()
        prof_py.enable()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof_py.disable()
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(prof_py, stream=text).sort_stats(order).print_stats(20)
            lines.append(f"python profile, 5 steps, by {order}:")
            lines += [ln for ln in text.getvalue().splitlines() if ln.strip()][4:28]
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        lines.append("top host (self CPU, ms over 3 steps):")
        for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:25]:
            lines.append(f"  {e.self_cpu_time_total / 1e3:9.3f} x{e.count:5d}  {e.key[:110]}")
        lines.append("top GPU (self device, ms over 3 steps):")
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
        for e in sorted(avg, key=lambda e: -getattr(e, key))[:25]:
            lines.append(f"  {getattr(e, key) / 1e3:9.3f} x{e.count:5d}  {e.key[:110]}")
        print("\n".join(lines[-150:]), flush=True)
    with open(os.path.join(args.out, f"fsdp2-overhead-{args.config}-{args.shape}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
