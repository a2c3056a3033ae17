"""``python -m bench.decode``: the decode sequence, dynamic batch sizes at T=1 (issue 14).

An HF Llama (``sdpa``, d=2048, 8 layers, GQA 16/4 on the GPU; the tiny config
with ``--smoke``) in eval mode without gradients is called at T=1 with batch
sizes 1, 3, 8, 13, 24, 40, each once positionally (``f(ids)``) and once by
keyword (``f(input_ids=ids)``) as generation loops do. Per backend and mode,
in one process: Dynamo's graph count over that first pass, the relative error
of the logits against eager, and the steady latency per size (the harness's
latency timing), with the backends interleaved in rounds so that drift of the
host (this regime is launch-bound) falls on both alike. The first pass itself
(compiles included) is timed in fresh processes, cold (empty Inductor and
Triton caches) and warm (the same caches again): in one process the second
backend would reuse kernels the first compiled.

    python -m bench.decode --out bench/results --stem 2026-11-30-h200-decode
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from kp_compiler.testing import hf
from kp_compiler.testing.compare import rel_error

from . import report
from .timing import time_fn

SIZES = (1, 3, 8, 13, 24, 40)
BACKENDS = ("inductor", "kernelpytorch")
BUCKETS = "pow2:64"  # kernelpytorch-buckets: options["cudagraph_buckets"] (issue 18)


def _backends(mode: str) -> tuple:
    """The rows of ``mode``: in reduce-overhead also kernelpytorch with its batch buckets."""
    return BACKENDS + (("kernelpytorch-buckets",) if mode == "reduce-overhead" else ())


def _compile(model, backend: str, mode: str):
    if backend == "kernelpytorch-buckets":
        return torch.compile(model, backend="kernelpytorch", options={"mode": mode, "cudagraph_buckets": BUCKETS})
    return torch.compile(model, backend=backend, mode=None if mode == "default" else mode)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_pass(f, ids: dict, device: str, start: "float | None" = None) -> float:
    """Seconds for the six sizes' first calls, each positionally and by keyword (compiles included), from
    ``start`` if given (the ``torch.compile`` call: a backend may import its compiler there or at the
    first call, and the user waits for both)."""
    _sync(device)
    start = time.perf_counter() if start is None else start
    for b in SIZES:
        f(ids[b])
        f(input_ids=ids[b])
    _sync(device)
    return time.perf_counter() - start


def run_mode(model, mode: str, device: str, reps: int, rounds: int, refs: dict) -> list:
    """One row per backend in ``mode``: each compiled over the sequence in turn (Dynamo's automatic-dynamic
    state cleared between them, so each makes its own graphs; the graph count is its own), then every
    size timed with the backends interleaved in ``rounds`` rounds (order reversed each round, samples
    pooled), so drift in a host-bound regime falls on both alike."""
    from torch._dynamo.utils import counters

    from .runner import _recompile_limit, _reset_code_state
    from .timing import median_ci

    torch._dynamo.reset()
    ids = {b: refs[b][0] for b in SIZES}
    rows, fns = [], []
    with _recompile_limit(8 * len(_backends(mode))), torch.no_grad():
        for backend in _backends(mode):
            _reset_code_state()
            before = counters["stats"]["unique_graphs"]
            row: dict = {"backend": backend, "mode": mode}
            f = _compile(model, backend, mode)
            try:
                row["first_pass_in_process_s"] = first_pass(f, ids, device)
                row["graphs"] = counters["stats"]["unique_graphs"] - before
                row["error"] = {b: rel_error([f(ids[b]).logits.float()], [refs[b][1]]) for b in SIZES}
            except Exception as e:  # noqa: BLE001 - one row failing must not stop the run
                row["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                f = None
            rows.append(row)
            fns.append(f)
        live = [(r, f) for r, f in zip(rows, fns) if f is not None]
        for r, _ in live:
            r["steady_ms"], r["ci95_ms"], r["rounds"] = {}, {}, rounds
        for b in SIZES:
            samples: dict = {id(r): [] for r, _ in live}
            for k in range(rounds):
                for r, f in (live if k % 2 == 0 else live[::-1]):
                    t = time_fn(lambda f=f, b=b: f(ids[b]), device, max(5, -(-reps // rounds)))
                    samples[id(r)].extend(t.samples)
            for r, _ in live:
                t = median_ci(samples[id(r)])
                r["steady_ms"][b], r["ci95_ms"][b] = t.median_ms, [t.ci_low_ms, t.ci_high_ms]
    torch._dynamo.reset()
    return rows


def first_pass_in_fresh_process(backend: str, mode: str, cache_dir: str, smoke: bool, device: str) -> dict:
    """The first pass in a new process whose Inductor and Triton caches live in ``cache_dir``: an empty
    folder gives the cold start a new user sees, the same folder again the warm restart.
    ``{"first_pass_s", "peak_gib"}``: seconds, and the process's peak GPU memory (0 on the CPU)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    cmd = [sys.executable, "-m", "bench.decode", "--first-pass-child", backend, mode, "--device", device]
    cmd += ["--smoke"] if smoke else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"first-pass child for {backend}/{mode} failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Decode sequence: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"transformers {meta.get('transformers')}, commit {str(meta['git_commit'])[:10]}",
        "",
        f"{meta['model']}, T=1, batch sizes {', '.join(map(str, SIZES))}; each size called positionally and by "
        f"keyword. Steady ms per size: median of the harness's latency timing, backends interleaved in "
        f"{meta.get('rounds', 1)} round(s) with the order reversed each round, samples pooled (95% CI in the "
        "JSON); ratio = Inductor's time in the same mode over this row's.",
        "",
        "| backend | mode | graphs | " + " | ".join(f"bs={b} ms" for b in SIZES)
        + " | worst ratio vs Inductor | max rel. error |",
        "|---|---|---|" + "---|" * len(SIZES) + "---|---|",
    ]
    base = {r["mode"]: r for r in results["rows"] if r["backend"] == "inductor" and "failed" not in r}
    for r in results["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['backend']} | {r['mode']} | failed: {r['failed'][:120]} |")
            continue
        ref = base.get(r["mode"])
        ratios = [ref["steady_ms"][b] / r["steady_ms"][b] for b in SIZES] if ref else [None] * len(SIZES)
        times = " | ".join(f"{r['steady_ms'][b]:.3f}" + (f" ({q:.2f}x)" if q else "") for b, q in zip(SIZES, ratios))
        worst = f"{min(ratios):.2f}x" if ref else ""
        lines.append(f"| {r['backend']} | {r['mode']} | {r['graphs']} | {times} | {worst} "
                     f"| {max(r['error'].values()):.1e} |")
    if results.get("first_pass"):
        lines += ["", "First pass = from the `torch.compile` call through the six sizes' first calls (both call "
                  "styles), compiles included, each in a fresh process: cold on an empty Inductor/Triton cache folder, then warm on the same folder; "
                  "the backends alternate in order from one repeat to the next. Seconds per repeat; median; "
                  "ratio = Inductor's median over this row's. Peak GiB = the most GPU memory each process "
                  "allocated (model and references included), over its processes.", "",
                  "| backend | mode | cold s | cold median | vs Inductor | warm s | warm median | vs Inductor "
                  "| peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        med = {(r["backend"], r["mode"]): r for r in results["first_pass"]}
        for r in results["first_pass"]:
            if r.get("failed"):
                lines.append(f"| {r['backend']} | {r['mode']} | failed: {r['failed'][:120]} |")
                continue
            ref = med.get(("inductor", r["mode"]))
            cells = []
            for kind in ("cold", "warm"):
                m = statistics.median(r[kind])
                q = statistics.median(ref[kind]) / m if ref and not ref.get("failed") else None
                cells.append(f"{', '.join(f'{x:.1f}' for x in r[kind])} | {m:.1f} | " + (f"{q:.2f}x" if q else ""))
            lines.append(f"| {r['backend']} | {r['mode']} | {cells[0]} | {cells[1]} "
                         f"| {max(r.get('peak_gib') or [0.0]):.2f} |")
    return "\n".join(lines) + "\n"


def time_first_passes(modes, repeats: int, smoke: bool, device: str, only=None) -> list:
    """Per backend and mode: the first pass in fresh processes, cold then warm, ``repeats`` times, the
    backends' order reversed from one repeat to the next; ``only``: these backends alone."""
    def chosen(m):
        return tuple(b for b in _backends(m) if not only or b in only)
    rows = {(b, m): {"backend": b, "mode": m, "cold": [], "warm": []} for m in modes for b in chosen(m)}
    for k in range(repeats):
        for m in modes:
            for b in (chosen(m) if k % 2 == 0 else chosen(m)[::-1]):
                row = rows[(b, m)]
                if row.get("failed"):
                    continue
                with tempfile.TemporaryDirectory(prefix="kp-decode-cache-") as cache:
                    try:
                        for kind in ("cold", "warm"):
                            got = first_pass_in_fresh_process(b, m, cache, smoke, device)
                            row[kind].append(got["first_pass_s"])
                            row.setdefault("peak_gib", []).append(got.get("peak_gib", 0.0))
                    except Exception as e:  # noqa: BLE001
                        row["failed"] = str(e)[:300]
                print(json.dumps(row), file=sys.stderr, flush=True)
    return list(rows.values())


def _first_pass_child(backend: str, mode: str, smoke: bool, device: str) -> int:
    model, vocab, refs = _setup(smoke, device)
    _sync(device)
    start = time.perf_counter()
    f = _compile(model, backend, mode)
    with torch.no_grad():
        seconds = first_pass(f, {b: refs[b][0] for b in SIZES}, device, start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    print(json.dumps({"first_pass_s": seconds, "peak_gib": peak}))
    return 0


def _setup(smoke: bool, device: str):
    size = "tiny" if smoke else "decode"
    dtype = torch.float32 if smoke else torch.bfloat16
    model, vocab = hf.build("llama", size, attn="sdpa")
    model = model.to(device, dtype)
    g = torch.Generator().manual_seed(0)
    refs = {}
    with torch.no_grad():
        for b in SIZES:
            ids = torch.randint(0, vocab, (b, 1), generator=g).to(device)
            refs[b] = (ids, model(ids).logits.float())
    return model, vocab, refs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny Llama, fp32, on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed calls per backend and size, over all rounds")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per size, the backends' order reversed each round (default 4; 1 in smoke)")
    p.add_argument("--modes", nargs="*", default=["default", "reduce-overhead"])
    p.add_argument("--first-pass-modes", nargs="*", default=None,
                   help="modes whose first pass is also timed in fresh processes, cold (empty caches) and warm "
                        "(the same caches again); default: default mode, none in smoke runs")
    p.add_argument("--first-pass-repeats", type=int, default=3, help="fresh-process first passes per backend")
    p.add_argument("--first-pass-backends", nargs="*", default=None,
                   help="time the first pass of these rows only (e.g. inductor kernelpytorch-buckets)")
    p.add_argument("--first-pass-child", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    if args.first_pass_child:
        return _first_pass_child(*args.first_pass_child, args.smoke, args.device)
    import transformers

    reps = args.reps or (3 if args.smoke else 60)
    rounds = args.rounds or (1 if args.smoke else 4)
    fp_modes = args.first_pass_modes if args.first_pass_modes is not None else ([] if args.smoke else ["default"])
    model, vocab, refs = _setup(args.smoke, args.device)
    size = "tiny" if args.smoke else "decode"
    s = hf.SIZES[size]
    dtype = next(model.parameters()).dtype
    results = {"meta": report.provenance(args.device) | {
        "transformers": transformers.__version__, "dtype": str(dtype), "smoke": args.smoke, "rounds": rounds,
        "model": f"HF Llama sdpa, d={s['d']}, {s['layers']} layers, GQA {s['heads']}/{s['kv_heads']}, {dtype}"},
        "rows": []}
    for mode in args.modes:
        for row in run_mode(model, mode, args.device, reps, rounds, refs):
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if fp_modes:
        del model, refs  # the children need the device memory more
        results["first_pass"] = time_first_passes(fp_modes, args.first_pass_repeats, args.smoke, args.device,
                                                  args.first_pass_backends)
    stem = args.stem or f"{time.strftime('%Y-%m-%d')}-{'smoke' if args.smoke else args.device}-decode"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    text = markdown(results)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if any(r.get("failed") for r in results["rows"] + results.get("first_pass", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
