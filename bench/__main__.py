"""``python -m bench``: run cases under every backend in one process, write the tables.

    python -m bench --smoke                       # CPU, tiny shapes (CI)
    python -m bench --cases 'attention-*' --out bench/results
    python -m bench --groups e2e --backends eager inductor kernelpytorch
    python -m bench --kp-options '{"lowering": "eager"}' --compare bench/results/x.json
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import sys
import time

import torch

from . import report
from .backends import DEFAULT, choose
from .cases import Scale, load_all
from .runner import run_case


def _progress(total: int):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="run", file=sys.stderr)

        def step(label):
            bar.set_description(label[:60])
            bar.update(1)
        return step, bar.close
    except ImportError:
        done = [0]

        def step(label):
            done[0] += 1
            print(f"[{done[0]}/{total}] {label}", file=sys.stderr, flush=True)
        return step, lambda: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, few repetitions (CPU CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on the GPU by default, float32 in smoke runs")
    p.add_argument("--cases", nargs="*", default=["*"], help="glob patterns over case names")
    p.add_argument("--groups", nargs="*", default=None, help="only these groups (attention, moe, linear, fp8-sized, fp8, e2e, models)")
    p.add_argument("--backends", nargs="*", default=list(DEFAULT))
    p.add_argument("--kp-options", default=None, help="JSON options for an extra kernelpytorch row")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per case, the backends' order reversed each round, samples pooled "
                        "(default 4; 1 in smoke runs)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default=None, help="output file name stem (default: date and device)")
    p.add_argument("--compare", default=None, help="baseline JSON: flag speedups outside its 95%% CI")
    p.add_argument("--keep-caches", action="store_true",
                   help="keep Inductor's FX graph and autograd caches (compile times then undercount)")
    p.add_argument("--timing", choices=("latency", "gpu"), default="latency",
                   help="latency: events around each call (launch overhead counts when the GPU waits for it); "
                        "gpu: a queued sleep first, so the events time the GPU work only")
    p.add_argument("--row-timeout", type=float, default=0,
                   help="seconds one backend of one case may take (compile included); past it the row is "
                        "recorded as failed and the run goes on (0: no limit)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if not args.keep_caches:
        # Every backend compiles from scratch, so compile times compare fairly.
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False

    cases = load_all()
    selected = []  # in the order of the patterns, so a time-limited run does the first ones first
    for pat in args.cases:
        selected += [c for n, c in cases.items() if fnmatch.fnmatch(n, pat) and c not in selected
                     and (args.groups is None or c.group in args.groups)]
    if args.list:
        print("\n".join(f"{c.group:10s} {c.name}" for c in selected))
        return 0
    missing = {c.name: r for c in selected for r in c.requires if importlib.util.find_spec(r) is None}
    for name, mod in missing.items():
        print(f"skipping {name}: needs {mod}", file=sys.stderr)
    selected = [c for c in selected if c.name not in missing]
    if not selected:
        print("no case selected", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.smoke else torch.bfloat16)
    scale = Scale(args.device, dtype, args.smoke, args.timing)
    reps = args.reps or (5 if args.smoke else 50)
    rounds = args.rounds or (1 if args.smoke else 4)
    if rounds < 1:
        p.error("--rounds must be at least 1")
    backends = choose(args.backends, args.kp_options)
    stem = args.stem or f"{time.strftime('%Y-%m-%d')}-{'smoke' if args.smoke else args.device}"

    results = {"meta": report.provenance(args.device) | {"dtype": str(dtype), "smoke": args.smoke, "timing": args.timing, "rounds": rounds}, "cases": []}
    step, close = _progress(len(selected) * len(backends))
    try:
        for case in selected:
            chosen = [b for b in backends if not case.backends or b.name in case.backends] or backends
            results["cases"].append(run_case(case, chosen, scale, reps, step, args.row_timeout, rounds))
            report.write(results, args.out, stem)  # after every case: a cut-off run keeps what it has
    finally:
        close()
    paths = report.write(results, args.out, stem)
    print(report.markdown(results))
    print("wrote " + ", ".join(paths.values()))
    if args.compare:
        import json

        with open(args.compare) as f:
            flags = report.compare(results, json.load(f))
        print("\n".join(["outside the baseline's 95% CI:"] + flags) if flags else "all speedups within the baseline's 95% CI")
    failed = [r for c in results["cases"] for r in c.get("rows", []) if r.get("failed")]
    failed += [c for c in results["cases"] if c.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
