"""``Launcher``: launch a Triton kernel with less host time than ``kernel[grid](...)``.

``JITFunction.run`` rebuilds the kernel's specialization key from every
argument at each call (binder, cache key, device and stream lookups): about
30 us of host time per launch on the H100 machine (``bench/results``,
``2026-11-24-h100-fp8-overhead.txt``), which adds up in a training step that
casts three tensors per linear. ``Launcher(kernel)(grid, *args, **constexprs)``
launches the same compiled kernel:

- the first call of each specialization goes through ``kernel[grid](...)``,
  which compiles (or finds) the kernel; the ``CompiledKernel`` it returns is
  kept under a key at least as fine as Triton's own specialization (per
  tensor: dtype and 16-byte alignment; per int: whether it is 1, a multiple
  of 16, and fits 32 bits; the constexprs and launch options by value);
- later calls with the same key call the compiled kernel's launcher directly.

Only on the Triton versions this was checked against (``VERIFIED``: the
launcher's argument list is internal to Triton), on CUDA tensors, and while
no launch hook is set (profilers); everywhere else, and under
``TRITON_INTERPRET=1``, it is ``kernel[grid](...)``.

Runtime arguments come first, positionally, in the kernel's order;
constexprs follow as keywords (every constexpr of the kernel must be given).
"""

from __future__ import annotations

import os

import torch
import triton

VERIFIED = ("3.6",)


def _version_ok() -> bool:
    return ".".join(triton.__version__.split(".")[:2]) in VERIFIED and os.environ.get("TRITON_INTERPRET") != "1"


def _spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return "i", a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63
    return type(a), a


def _hooks_set() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps them in ``HookChain``s, empty unless a profiler adds one)."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is None:
        return True
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs)`` does what ``kernel[grid](*args, **constexprs)`` does."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = list(kernel.arg_names)
        self.fast = _version_ok()
        self.cache: dict = {}
        self.stats = {"fast": 0, "slow": 0}

    def __call__(self, grid, *args, **constexprs):
        first = args[0]
        if not (self.fast and first.is_cuda) or _hooks_set():
            self.stats["slow"] += 1
            return self.kernel[grid](*args, **constexprs)
        device = first.device.index
        key = (device, tuple(map(_spec, args)), tuple(constexprs.items()))
        hit = self.cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **constexprs)
            if hasattr(compiled, "result"):
                compiled = compiled.result()
            tail = tuple(constexprs[n] for n in self.names[len(args):])
            self.cache[key] = (compiled, tail)
            self.stats["slow"] += 1
            return compiled
        compiled, tail = hit
        self.stats["fast"] += 1
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, _stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)
        return compiled


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: Triton 3.6 wraps its helper as a JIT function, about 7 us per call on a CPU
    core (four per routed-experts forward)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (the same wrapper cost as ``cdiv``); 0 for 0, as Triton's."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def fastest(candidates, launch, reps: int = 3):
    """The candidate ``config`` for which ``launch(config)`` takes the least GPU time (after one compiling and
    warming launch each; ``reps`` timed), or None when none fits this GPU's shared memory and registers."""
    timings = []
    for config in candidates:
        try:
            launch(config)  # compile and warm
        except triton.runtime.errors.OutOfResources:
            continue  # too much shared memory or too many registers on this GPU
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            launch(config)
        end.record()
        end.synchronize()
        timings.append((start.elapsed_time(end), config))
    return min(timings, key=lambda t: t[0])[1] if timings else None
