"""Run one case under every backend: time, compile time, memory, error vs a reference.

The reference is the eager model in float64 (CPU) or float32 (GPU). Error is
the relative L2 error of the output (inference) or of all gradients, input
and parameter (training, first step before the optimizer moves anything).
"""

from __future__ import annotations

import contextlib
import copy
import signal
import time
import traceback
from typing import Any

import torch

from kp_compiler.core.report import collect

from kp_compiler.testing.compare import dynamo_config, grad_error, grads_of, missing_grads, rel_error

from .backends import Backend
from .cases import Case, Scale, Workload
from .timing import median_ci, time_fn


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _upcast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(dtype).requires_grad_(x.requires_grad)
    return x


def _grads(model: Any, inputs: tuple) -> dict:
    """Every input and parameter gradient by name, ``None`` where there is none (a lost one is an error)."""
    params = list(model.named_parameters()) if isinstance(model, torch.nn.Module) else []
    leaves = [(f"input {i}", t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    return grads_of(leaves + params)


class Step:
    """One call of the workload: inference under no_grad, or a full training step.

    A workload with ``more_inputs`` (a dynamic-length case) runs one call per input tuple in a step;
    captured, its outputs are flattened and joined, its gradients named by tuple (``"1: input 0"``).
    """

    def __init__(self, wl: Workload, model: Any, compiled: Any, train: bool, device: str):
        self.wl, self.model, self.compiled, self.train = wl, model, compiled, train
        self.input_sets = [tuple(_upcast(x, x.dtype) if isinstance(x, torch.Tensor) else x for x in inputs)
                           for inputs in (wl.inputs, *wl.more_inputs)]
        self.inputs = self.input_sets[0]
        self.opt = None
        if train and isinstance(model, torch.nn.Module) and any(True for _ in model.parameters()):
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def __call__(self, capture: bool = False):
        results = [self._one(inputs, capture) for inputs in self.input_sets]
        if not capture or len(results) == 1:
            return results[0]
        if not self.train:
            return torch.cat([r.flatten() for r in results])
        return {f"{i}: {name}": g for i, grads in enumerate(results) for name, g in grads.items()}

    def _one(self, inputs: tuple, capture: bool):
        if not self.train:
            with torch.no_grad():
                out = self.compiled(*inputs)
            if not capture:
                return None
            out = self.wl.output(out)  # kept while the step's later calls run: a copy (CUDA graphs reuse theirs)
            return out.clone() if isinstance(out, torch.Tensor) else out
        loss = self.wl.loss(self.compiled(*inputs))
        loss.backward()
        grads = _grads(self.model, inputs) if capture else None
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        return grads


def reference(wl: Workload, train: bool, scale: Scale) -> list[torch.Tensor]:
    dtype = torch.float64 if scale.device == "cpu" else torch.float32
    if wl.reference_dtype is not None:
        dtype = wl.reference_dtype
    model = wl.model
    if isinstance(model, torch.nn.Module):
        model = copy.deepcopy(model).to(dtype)
    ref_wl = copy.copy(wl)
    ref_wl.inputs = tuple(_upcast(x, dtype) for x in wl.inputs)
    ref_wl.more_inputs = [tuple(_upcast(x, dtype) for x in inputs) for inputs in wl.more_inputs]
    ref_wl.model = model
    step = Step(ref_wl, model, model, train, scale.device)
    out = step(capture=True)
    return [out] if not train else out  # train: {name: grad or None}


@contextlib.contextmanager
def _recompile_limit(n: int):
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(n, getattr(cfg, name))}):
        yield


class RowTimeout(Exception):
    """One backend of one case ran past ``--row-timeout``."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise ``RowTimeout`` in the main thread after ``seconds`` (0: no limit; POSIX only)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"ran past the {seconds:.0f} s row limit (--row-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def prepare_backend(case: Case, wl: Workload, backend: Backend, ref, scale: Scale,
                    row_timeout: float = 0) -> tuple[dict, "Step | None"]:
    """Compile one backend's row and check it: the row so far (passes, error, compile time, memory) and
    its step, or ``None`` with ``failed`` in the row. Dynamo's automatic-dynamic state is cleared first,
    so what one backend saw does not shape another's graphs."""
    _reset_code_state()
    model = copy.deepcopy(wl.model) if isinstance(wl.model, torch.nn.Module) else wl.model
    row: dict = {"backend": backend.name}
    try:
        with _time_limit(row_timeout), dynamo_config(wl.dynamo_config):
            step = Step(wl, model, backend.for_case(wl.kp_options).wrap(model), case.train, scale.device)
            _sync(scale.device)
            graphs_before = _compiled_graphs()
            t0 = time.perf_counter()
            with collect() as records:
                first = step(capture=True)
            _sync(scale.device)
            row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            if wl.more_inputs and backend.backend is not None:
                row["compiles"] = _compiled_graphs() - graphs_before
            if records:  # kernelpytorch: the rewrites that fired, summed over graphs
                fired: dict = {}
                for rec in records:
                    for p in rec.passes:
                        fired[p.name] = fired.get(p.name, 0) + p.matches
                row["passes"] = {k: v for k, v in fired.items() if v}
                row["graphs"] = len(records)
                row["buckets"] = [rec.buckets for rec in records if getattr(rec, "buckets", None)]
                row["idle_graphs"] = sum(any("nothing to rewrite" in x["reason"] for x in rec.skipped) for rec in records)
            if case.train:
                row["error"] = grad_error(first, ref)  # inf where a gradient is None on one side only
                row["missing_grads"] = missing_grads(first, ref)
            else:
                row["error"] = rel_error([first], ref)
            row["peak_mem_gb"] = _step_memory(step, scale.device)
    except Exception as e:  # noqa: BLE001 - one backend failing must not stop the run
        row["failed"] = _describe(e)
        row["traceback"] = traceback.format_exc()[-2000:]
        return row, None
    return row, step


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _step_memory(step: "Step", device: str) -> "float | None":
    """GiB one step allocates above what is held before it (other rows' models stay alive while the
    rounds interleave, so the process-wide peak would count them)."""
    if device != "cuda":
        return None
    step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**30


def _reset_code_state() -> None:
    try:
        from torch._dynamo.pgo import reset_code_state
    except ImportError:  # older torch: no profile-guided state to clear
        return
    reset_code_state()


def time_rows(rows: list, steps: list, wl: Workload, scale: Scale, reps: int, rounds: int) -> None:
    """Time every compiled row in ``rounds`` rounds, the order reversed each round (A B C, C B A, ...),
    and pool each row's samples: drift in the machine over the run (clocks, host load) falls on every
    backend alike instead of on whichever ran last."""
    live = [(row, step) for row, step in zip(rows, steps) if step is not None]
    samples: dict = {id(row): [] for row, _ in live}
    per_round = max(5, -(-reps // rounds))
    for r in range(rounds):
        for row, step in (live if r % 2 == 0 else live[::-1]):
            if "failed" in row:
                continue
            try:
                with dynamo_config(wl.dynamo_config):
                    t = time_fn(step, scale.device, per_round, hide_launch=scale.timing == "gpu")
            except Exception as e:  # noqa: BLE001
                row["failed"] = _describe(e)
                row["traceback"] = traceback.format_exc()[-2000:]
                continue
            samples[id(row)].extend(t.samples)
    for row, _ in live:
        if "failed" in row:
            continue
        timing = median_ci(samples[id(row)])
        row.update(timing.to_json())
        row["rounds"] = rounds
        row["compile_s"] = max(0.0, row["first_call_ms"] - timing.median_ms) / 1e3
        if wl.flops:
            row["tflops"] = wl.flops / (timing.median_ms * 1e-3) / 1e12
        if wl.bytes:
            row["gb_per_s"] = wl.bytes / (timing.median_ms * 1e-3) / 1e9


def _describe(e: Exception) -> str:
    inner = getattr(e, "inner_exception", None) or e  # Dynamo wraps backend errors
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text}"[:300]


def run_case(case: Case, backends: list[Backend], scale: Scale, reps: int, progress=None,
             row_timeout: float = 0, rounds: int = 1) -> dict:
    """Every backend's row for one case: each compiled and checked in turn (no Dynamo reset between them:
    each backend keeps its own cache entries), then all timed together in ``rounds`` interleaved rounds."""
    result = {"case": case.name, "group": case.group, "train": case.train, "rows": []}
    try:
        wl = case.build(scale)
        with dynamo_config(wl.dynamo_config):
            ref = reference(wl, case.train, scale)
    except Exception as e:  # noqa: BLE001
        result["failed"] = _describe(e)
        return result
    result["flops"], result["bytes"] = wl.flops, wl.bytes
    torch._dynamo.reset()
    steps = []
    with _recompile_limit(8 * max(1, len(backends))):  # the limit counts every backend's entries
        for backend in backends:
            row, step = prepare_backend(case, wl, backend, ref, scale, row_timeout)
            result["rows"].append(row)
            steps.append(step)
            if progress is not None:
                progress(f"{case.name} / {backend.name}")
        del ref
        time_rows(result["rows"], steps, wl, scale, reps, rounds)
    del steps
    torch._dynamo.reset()
    _add_speedups(result)
    return result


def _add_speedups(result: dict) -> None:
    base = next((r for r in result["rows"] if r["backend"] == "inductor" and "median_ms" in r), None)
    for r in result["rows"]:
        if base is not None and "median_ms" in r:
            r["speedup_vs_inductor"] = base["median_ms"] / r["median_ms"]
            lo, hi = r["ci95_ms"]
            blo, bhi = base["ci95_ms"]
            r["speedup_ci95"] = [blo / hi, bhi / lo]
