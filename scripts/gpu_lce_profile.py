"""Issue 20 diagnostics on the GPU: where the ``lce-128k-train`` step's time and memory go, Inductor against
kernelpytorch with ``linear-cross-entropy`` (the bench case's own model, step and options). Not a benchmark:

1. per row, the CUDA kernels of 3 steps by total time (``torch.profiler``), top 14, and the GPU's idle gaps
   between kernels (where the host, not the GPU, set the pace);
2. per row, the step's memory peak above what is held before it, and the blocks live at that moment, largest
   first, each with the innermost frames of the Python stack that allocated it (``torch.cuda.memory``'s
   allocation history, replayed);
3. per row, the host: how long a step takes to queue its work (``step()`` returning, no sync) against its wall
   time with a sync, the host time of ``kp::linear_cross_entropy`` per call, and the CUDA runtime's allocation
   calls per step (a ``cudaMalloc`` in a steady step is host time the caching allocator should have saved).
    PYTHONPATH=. python scripts/gpu_lce_profile.py [case] [--host]   (--host: the host section only)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.backends import STANDARD
from bench.cases import Scale, load_all
from bench.runner import Step


def kernels(step, top=14):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    gaps(prof)
    rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows) / 3e3
    print(f"  GPU time per step {total:.3f} ms; top kernels (ms per step, calls per step):")
    for e in rows[:top]:
        print(f"    {e.device_time_total / 3e3:7.3f}  x{e.count // 3:<4d} {e.key[:110]}")


def gaps(prof, top=6):
    """The GPU's idle time between consecutive kernels of the 3 steps (a step starts after a sync, so each
    step's first kernel follows a gap that the host's lead-in makes), total and the largest gaps."""
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    if len(evs) < 2:
        return
    found, end = [], evs[0].time_range.end
    for prev, e in zip(evs, evs[1:]):
        if e.time_range.start > end:
            found.append((e.time_range.start - end, prev.name, e.name))
        end = max(end, e.time_range.end)
    print(f"  GPU idle between kernels {sum(g for g, *_ in found) / 3e3:.3f} ms per step; largest gaps:")
    for g, a, b in sorted(found, reverse=True)[:top]:
        print(f"    {g / 1e3:7.3f} ms  after {a[:60]}  before {b[:60]}")


def _frames(frames, n=3):
    keep = [f for f in frames if "kp_compiler" in f["filename"] or "transformers" in f["filename"]
            or "torch/_inductor" in f["filename"] or "torch/autograd" in f["filename"] or "bench/" in f["filename"]]
    return " <- ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in (keep or frames)[:n])


def memory(step, top=12):
    step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    print(f"  step peak +{peak / 2**30:.3f} GiB above {held / 2**30:.3f} GiB held; live at the peak:")
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:top]:
        print(f"    {ev['size'] / 2**30:6.3f} GiB  {_frames(ev.get('frames', []))}")


def host(step, reps=10):
    queued, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        queued.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    queued.sort()
    wall.sort()
    print(f"  host: step queued in {queued[reps // 2] * 1e3:.3f} ms, wall with sync {wall[reps // 2] * 1e3:.3f} ms "
          "(median)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    names = ("kp::linear_cross_entropy", "cudaMalloc", "cudaFree", "cudaMemsetAsync", "cudaLaunchKernel",
             "cuLaunchKernelEx", "cuLaunchKernel", "cudaStreamSynchronize", "cudaDeviceSynchronize",
             "cudaMemcpyAsync", "cudaEventSynchronize", "cudaStreamWaitEvent", "cudaEventQuery")
    avgs = prof.key_averages()
    for e in avgs:
        if e.key in names:
            print(f"    {e.key:28s} {e.count / 3:6.1f} calls per step, host {e.cpu_time_total / 3e3:.3f} ms per step")
    print("    top host time by op (self, ms per step, calls per step):")
    for e in sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:16]:
        print(f"      {e.self_cpu_time_total / 3e3:7.3f}  x{e.count // 3:<4d} {e.key[:90]}")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args else "lce-128k-train"
    print(torch.__version__, torch.cuda.get_device_name(), name, flush=True)
    case = load_all()[name]
    scale = Scale("cuda", torch.bfloat16, False)
    wl = case.build(scale)
    for backend in ("inductor", "kernelpytorch"):
        import copy
        model = copy.deepcopy(wl.model)
        b = STANDARD[backend].for_case(wl.kp_options)
        step = Step(wl, model, b.wrap(model), True, "cuda")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        print(f"{backend}:", flush=True)
        if "--host" not in sys.argv:
            kernels(step)
            memory(step)
        host(step)
        del step, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
