"""``python -m bench.decode``: the decode sequence, dynamic batch sizes at T=1 (issue 14).

An HF Llama (``sdpa``, d=2048, 8 layers, GQA 16/4 on the GPU; the tiny config
with ``--smoke``) in eval mode without gradients is called at T=1 with batch
sizes 1, 3, 8, 13, 24, 40, each once positionally (``f(ids)``) and once by
keyword (``f(input_ids=ids)``) as generation loops do. Per backend and mode,
in one process: the time of that first pass over the six sizes (compiles
included), Dynamo's graph count, the steady latency per size (the harness's
latency timing) and the relative error of the logits against eager.

    python -m bench.decode --out bench/results --stem 2026-11-30-h200-decode
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from kp_compiler.testing import hf
from kp_compiler.testing.compare import rel_error

from . import report
from .timing import time_fn

SIZES = (1, 3, 8, 13, 24, 40)
ROWS = (("inductor", "default"), ("kernelpytorch", "default"),
        ("inductor", "reduce-overhead"), ("kernelpytorch", "reduce-overhead"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_row(model, vocab: int, backend: str, mode: str, device: str, reps: int, refs: dict) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    row: dict = {"backend": backend, "mode": mode}
    f = torch.compile(model, backend=backend, mode=None if mode == "default" else mode)
    ids = {b: refs[b][0] for b in SIZES}
    try:
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            for b in SIZES:
                f(ids[b])
                f(input_ids=ids[b])
            _sync(device)
            row["first_pass_s"] = time.perf_counter() - start
            row["graphs"] = counters["stats"]["unique_graphs"]
            row["steady_ms"], row["ci95_ms"], row["error"] = {}, {}, {}
            for b in SIZES:
                logits = f(ids[b]).logits.float()
                row["error"][b] = rel_error([logits], [refs[b][1]])
                t = time_fn(lambda b=b: f(ids[b]), device, reps)
                row["steady_ms"][b] = t.median_ms
                row["ci95_ms"][b] = [t.ci_low_ms, t.ci_high_ms]
    except Exception as e:  # noqa: BLE001 - one row failing must not stop the run
        row["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return row


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Decode sequence: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"transformers {meta.get('transformers')}, commit {str(meta['git_commit'])[:10]}",
        "",
        f"{meta['model']}, T=1, batch sizes {', '.join(map(str, SIZES))}; each size called positionally and by "
        "keyword. Steady ms per size: median of the harness's latency timing (95% CI in the JSON); "
        "ratio = Inductor's time in the same mode over this row's; first pass = the six sizes' first calls, "
        "compiles included.",
        "",
        "| backend | mode | graphs | first pass s | " + " | ".join(f"bs={b} ms" for b in SIZES)
        + " | worst ratio vs Inductor | max rel. error |",
        "|---|---|---|---|" + "---|" * len(SIZES) + "---|---|",
    ]
    base = {}  # per mode: Inductor's steady ms per size, averaged over its rows (--abba runs it twice)
    for r in results["rows"]:
        if r["backend"] == "inductor" and "failed" not in r:
            base.setdefault(r["mode"], []).append(r)
    base = {m: {"steady_ms": {b: sum(r["steady_ms"][b] for r in rs) / len(rs) for b in SIZES}} for m, rs in base.items()}
    for r in results["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['backend']} | {r['mode']} | failed: {r['failed'][:120]} |")
            continue
        ref = base.get(r["mode"])
        ratios = [ref["steady_ms"][b] / r["steady_ms"][b] for b in SIZES] if ref else []
        times = " | ".join(f"{r['steady_ms'][b]:.3f}" + (f" ({q:.2f}x)" if ref else "")
                           for b, q in zip(SIZES, ratios or [None] * len(SIZES)))
        lines.append(f"| {r['backend']} | {r['mode']} | {r['graphs']} | {r['first_pass_s']:.1f} | {times} "
                     f"| {min(ratios):.2f}x | {max(r['error'].values()):.1e} |" if ref else
                     f"| {r['backend']} | {r['mode']} | {r['graphs']} | {r['first_pass_s']:.1f} | {times} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny Llama, fp32, on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--modes", nargs="*", default=["default", "reduce-overhead"])
    p.add_argument("--abba", action="store_true",
                   help="run each mode's rows as Inductor, kernelpytorch, kernelpytorch, Inductor (order effects "
                        "in one process cancel; ratios are against Inductor's mean)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    import transformers

    size = "tiny" if args.smoke else "decode"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    reps = args.reps or (3 if args.smoke else 50)
    model, vocab = hf.build("llama", size, attn="sdpa")
    model = model.to(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    refs = {}
    with torch.no_grad():
        for b in SIZES:
            ids = torch.randint(0, vocab, (b, 1), generator=g).to(args.device)
            refs[b] = (ids, model(ids).logits.float())
    s = hf.SIZES[size]
    results = {"meta": report.provenance(args.device) | {
        "transformers": transformers.__version__, "dtype": str(dtype), "smoke": args.smoke,
        "model": f"HF Llama sdpa, d={s['d']}, {s['layers']} layers, GQA {s['heads']}/{s['kv_heads']}, {dtype}"},
        "rows": []}
    rows = [r for r in ROWS if r[1] in args.modes]
    if args.abba:
        rows = [row for m in args.modes for row in (("inductor", m), ("kernelpytorch", m), ("kernelpytorch", m),
                                                    ("inductor", m))]
    for backend, mode in rows:
        results["rows"].append(run_row(model, vocab, backend, mode, args.device, reps, refs))
        print(json.dumps(results["rows"][-1]), file=sys.stderr, flush=True)
    stem = args.stem or f"{time.strftime('%Y-%m-%d')}-{'smoke' if args.smoke else args.device}-decode"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    text = markdown(results)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if any(r.get("failed") for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
