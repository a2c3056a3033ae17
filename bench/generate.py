"""``python -m bench.generate``: a generation loop with transformers' static KV cache at varying batch sizes.

transformers' ``generate(..., cache_implementation="static")`` compiles the
decode step itself (``compile_config``: backend, mode, options), runs the
prefill uncompiled, and makes a new static cache per call, sized by the batch.
Per row, one model copy (each keeps its own compiled call) generates
``--new-tokens`` tokens greedily for prompts of ``--prompt`` tokens at batch
sizes 1, 3, 8, 13: a first pass (compiles included), then the steady time of
one ``generate`` per size, the rows interleaved in rounds with the order
reversed each round. Tokens are compared with the uncompiled model's: per size,
how many new tokens every sequence has equal before the first difference (in
bf16, greedy decoding drifts apart after some steps for Inductor too). Each
kernelpytorch row lists its graphs' bucket plans (sizes, or why not: the static
cache is written in place, which the row proof refuses).

Rows: ``inductor`` (default), ``inductor-reduce-overhead``,
``kernelpytorch-reduce-overhead`` and ``kernelpytorch-buckets``
(``options={"mode": "reduce-overhead", "cudagraph_buckets": "pow2:64"}``).

    python -m bench.generate --out bench/results --stem 2026-12-02-h200-generate
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

from kp_compiler.core.report import collect
from kp_compiler.testing import hf

from . import report
from .runner import _recompile_limit
from .timing import median_ci

SIZES = (1, 3, 8, 13)
ROWS = {
    "inductor": dict(backend="inductor", mode=None),
    "inductor-reduce-overhead": dict(backend="inductor", mode="reduce-overhead"),
    "kernelpytorch-reduce-overhead": dict(backend="kernelpytorch", mode=None, options={"mode": "reduce-overhead"}),
    "kernelpytorch-buckets": dict(backend="kernelpytorch", mode=None,
                                  options={"mode": "reduce-overhead", "cudagraph_buckets": "pow2:64"}),
}


def compile_config(row: str, device: str):
    from transformers import CompileConfig

    config = CompileConfig(**ROWS[row])
    config._compile_all_devices = device != "cuda"  # transformers compiles on CUDA only, unless told
    return config


def generate(model, ids, new_tokens: int, config=None):
    kwargs = dict(compile_config=config) if config is not None else dict(disable_compile=True)
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0, **kwargs)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    size = "tiny" if args.smoke else "decode"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    base, vocab = hf.build("llama", size, attn="sdpa")
    base = base.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(1, vocab, (b, args.prompt), generator=g).to(args.device) for b in SIZES}
    with torch.no_grad():
        want = {b: generate(base, prompts[b], args.new_tokens) for b in SIZES}
    rows, models = [], []
    torch._dynamo.reset()
    with _recompile_limit(8 * len(args.rows)), torch.no_grad():
        for name in args.rows:
            row: dict = {"row": name}
            model, config = copy.deepcopy(base), compile_config(name, args.device)
            before = counters["stats"]["unique_graphs"]
            try:
                with collect() as records:
                    _sync(args.device)
                    t0 = time.perf_counter()
                    got = {b: generate(model, prompts[b], args.new_tokens, config) for b in SIZES}
                    _sync(args.device)
                row["first_pass_s"] = time.perf_counter() - t0
                row["same_tokens"] = {b: bool(torch.equal(got[b], want[b])) for b in SIZES}
                row["equal_new_tokens"] = {b: equal_prefix(got[b], want[b], args.prompt) for b in SIZES}
                row["graphs"] = counters["stats"]["unique_graphs"] - before  # Dynamo's, for every row
                row["buckets"] = [r.buckets for r in records if r.buckets]
            except Exception as e:  # noqa: BLE001 - one row failing must not stop the run
                row["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                model = None
            rows.append(row)
            models.append((model, config))
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        live = [(r, m, c) for r, (m, c) in zip(rows, models) if m is not None]
        for b in SIZES:
            samples: dict = {id(r): [] for r, _, _ in live}
            for k in range(args.rounds):
                for r, m, c in (live if k % 2 == 0 else live[::-1]):
                    _sync(args.device)
                    t0 = time.perf_counter()
                    generate(m, prompts[b], args.new_tokens, c)
                    _sync(args.device)
                    samples[id(r)].append((time.perf_counter() - t0) * 1e3)
            for r, _, _ in live:
                t = median_ci(samples[id(r)])
                r.setdefault("steady_ms", {})[b] = t.median_ms
                r.setdefault("ci95_ms", {})[b] = [t.ci_low_ms, t.ci_high_ms]
    s = hf.SIZES[size]
    import transformers

    return {"meta": report.provenance(args.device) | {
        "transformers": transformers.__version__, "dtype": str(dtype), "rounds": args.rounds,
        "prompt": args.prompt, "new_tokens": args.new_tokens,
        "model": f"HF Llama sdpa, d={s['d']}, {s['layers']} layers, {dtype}"}, "rows": rows}


def equal_prefix(got: torch.Tensor, want: torch.Tensor, prompt: int) -> int:
    """How many generated tokens (after the ``prompt`` tokens) every sequence has equal before the first one
    that differs in any sequence."""
    if got.shape != want.shape:
        return 0
    same = (got[:, prompt:] == want[:, prompt:]).all(0)
    differ = (~same).nonzero()
    return int(differ[0, 0]) if len(differ) else same.numel()


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Generation with a static KV cache: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
             f"transformers {meta['transformers']}, commit {str(meta['git_commit'])[:10]}", "",
             f"{meta['model']}; `generate` with `cache_implementation=\"static\"`, prompt {meta['prompt']} tokens, "
             f"{meta['new_tokens']} new tokens, greedy; transformers compiles the decode step with each row's "
             f"`compile_config`. Steady ms per `generate` call: median over {meta['rounds']} rounds (rows "
             "interleaved, order reversed each round); ratio = Inductor default's time over this row's.", "",
             "| row | graphs | first pass s | " + " | ".join(f"bs={b} ms" for b in SIZES) + " | tokens equal to eager's |",
             "|---|---|---|" + "---|" * len(SIZES) + "---|"]
    ref = next((r for r in results["rows"] if r["row"] == "inductor" and "steady_ms" in r), None)
    for r in results["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['row']} | failed: {r['failed'][:150]} |")
            continue
        cells = []
        for b in SIZES:
            ms = _at(r["steady_ms"], b)  # int keys in the run, str keys once read back from its JSON
            q = _at(ref["steady_ms"], b) / ms if ref else None
            cells.append(f"{ms:.1f}" + (f" ({q:.2f}x)" if q else ""))
        lines.append(f"| {r['row']} | {r['graphs']} | {r['first_pass_s']:.1f} | {' | '.join(cells)} "
                     f"| {_agreement(r, meta['new_tokens'])} |")
    lines += ["", "Tokens equal to eager's: the fewest, over the sizes, of the new tokens every sequence has equal to "
              "the uncompiled model's before the first that differs."]
    plans = [(r["row"], b) for r in results["rows"] for b in r.get("buckets", [])]
    if plans:
        lines += ["", "Bucket plans (kernelpytorch rows, per graph):", ""]
        lines += [f"- {row}: " + (f"sizes {b['sizes']}" if "sizes" in b else f"none ({b.get('why')})")
                  for row, b in plans]
    return "\n".join(lines) + "\n"


def _at(per_size: dict, b: int):
    return per_size[b] if b in per_size else per_size[str(b)]


def _agreement(row: dict, new_tokens: int) -> str:
    if "equal_new_tokens" not in row:  # a file from before the count
        return "all" if all(row["same_tokens"].values()) else "not all"
    n = min(row["equal_new_tokens"].values())
    return f"all {new_tokens}" if n == new_tokens else f"first {n} of {new_tokens}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny Llama, fp32, on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; 8 in smoke runs)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 64; 4 in smoke runs)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 4; 1 in smoke runs)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    args.prompt = args.prompt or (8 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (4 if args.smoke else 64)
    args.rounds = args.rounds or (1 if args.smoke else 4)
    results = run(args)
    stem = args.stem or f"{time.strftime('%Y-%m-%d')}-{'smoke' if args.smoke else args.device}-generate"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    text = markdown(results)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
    failed = any(r.get("failed") for r in results["rows"])
    wrong = any(not all(r.get("same_tokens", {}).values()) for r in results["rows"] if not r.get("failed"))
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
