"""``linear-group`` on the decode model under ``mode="reduce-overhead"``: did it fire, and what did it change
(issue 18). kernelpytorch with its default passes against the same passes without ``linear-group``, one
process, latency timing (``bench.timing``), the two interleaved in rounds at batch 3, 13 and 24 (the sizes
below 3x Inductor default at ad95389); logits against the eager model's.

    PYTHONPATH=. python scripts/gpu_linear_group_ab.py
"""

import statistics

import torch

import kp_compiler
from bench.timing import median_ci, time_fn
from kp_compiler.core.report import collect
from kp_compiler.testing import hf
from kp_compiler.testing.compare import rel_error

SIZES = (3, 13, 24)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    model, vocab = hf.build("llama", "decode", attn="sdpa")
    model = model.cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = {b: torch.randint(0, vocab, (b, 1), generator=g).cuda() for b in SIZES}
    with torch.no_grad():
        refs = {b: model(ids[b]).logits.float() for b in SIZES}
    without = [p for p in kp_compiler.default_passes() if p != "linear-group"]
    rows = {}
    for name, passes in (("with linear-group", None), ("without", without)):
        torch._dynamo.reset()
        options = {"mode": "reduce-overhead"} | ({"passes": passes} if passes else {})
        f = torch.compile(model, backend="kernelpytorch", options=options)
        with collect() as records, torch.no_grad():
            errors = {b: rel_error([f(ids[b]).logits.float()], [refs[b]]) for b in SIZES}
            for b in SIZES:
                f(ids[b])
        fired = sum(p.matches for r in records for p in r.passes if p.name == "linear-group")
        notes = sorted({n for r in records for p in r.passes if p.name == "linear-group" for n in p.notes})
        print(f"{name}: linear-group matches {fired} over {len(records)} graph(s); errors "
              + ", ".join(f"{b}: {e:.3e}" for b, e in errors.items()), flush=True)
        for n in notes[:4]:
            print("   note:", n)
        rows[name] = f
    samples = {(n, b): [] for n in rows for b in SIZES}
    with torch.no_grad():
        for rnd in range(4):
            order = list(rows) if rnd % 2 == 0 else list(rows)[::-1]
            for b in SIZES:
                for n in order:
                    samples[(n, b)] += time_fn(lambda: rows[n](ids[b]), "cuda", 30).samples
    for b in SIZES:
        t = {n: median_ci(samples[(n, b)]) for n in rows}
        w, wo = t["with linear-group"], t["without"]
        print(f"bs={b}: with {w.median_ms:.3f} [{w.ci_low_ms:.3f}, {w.ci_high_ms:.3f}] ms, without "
              f"{wo.median_ms:.3f} [{wo.ci_low_ms:.3f}, {wo.ci_high_ms:.3f}] ms: {wo.median_ms / w.median_ms:.3f}x",
              flush=True)
    print("median ratio", statistics.median(
        median_ci(samples[("without", b)]).median_ms / median_ci(samples[("with linear-group", b)]).median_ms
        for b in SIZES))


if __name__ == "__main__":
    main()
