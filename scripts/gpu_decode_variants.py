"""Which layer of kernelpytorch costs host time per decode call (issue 14): the same HF Llama decode call
under backends that add one layer at a time, timed in one process in A..E E..A order.

  inductor       torch.compile's default backend
  compile-fx     a custom backend calling Inductor's compile_fx(gm, inputs) (what Dynamo sees as "not inductor")
  compile-fx-tag the same with kernelpytorch's config patch (its post-grad cache-key pass)
  kp-no-passes   kernelpytorch with passes=[] (canonicalization, regions, lowering only)
  kernelpytorch  the default passes

Per variant and batch size: steady latency (bench.timing), host ms per call, and for batch 1 the top
Python frames by own time (cProfile) so a frame one path has and the other lacks shows.
"""

import cProfile
import io
import pstats
import sys

import torch

from bench.timing import host_per_call, time_fn
from kp_compiler.lowering.inductor import _tag
from kp_compiler.testing import hf


def _compile_fx(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _compile_fx_tag(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": _tag()})


VARIANTS = {
    "inductor": dict(backend="inductor"),
    "compile-fx": dict(backend=_compile_fx),
    "compile-fx-tag": dict(backend=_compile_fx_tag),
    "kp-no-passes": dict(backend="kernelpytorch", options={"passes": []}),
    "kernelpytorch": dict(backend="kernelpytorch"),
}


def measure(model, vocab: int, name: str, profile: bool) -> dict:
    torch._dynamo.reset()
    f = torch.compile(model, **VARIANTS[name])
    out = {}
    with torch.no_grad():
        for b in (1, 8, 3):  # 1 static, 8 and 3 the dynamic graph, as the decode sequence makes them
            ids = torch.randint(0, vocab, (b, 1), device="cuda")
            f(ids)
        for b in (1, 8):
            ids = torch.randint(0, vocab, (b, 1), device="cuda")
            lat = time_fn(lambda: f(ids), "cuda", reps=200).median_ms
            host, wall = host_per_call(lambda: f(ids), 100)
            out[b] = (lat, host, wall)
            if profile and b == 1:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(200):
                    f(ids)
                pr.disable()
                torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
                print(f"---- cProfile {name} bs=1, 200 calls", flush=True)
                print("\n".join(s.getvalue().splitlines()[4:]), flush=True)
    return out


def main() -> int:
    model, vocab = hf.build("llama", "decode", attn="sdpa")
    model = model.cuda().to(torch.bfloat16).eval()
    names = list(VARIANTS)
    results: dict = {n: [] for n in names}
    for rnd, order in enumerate((names, names[::-1])):
        for n in order:
            r = measure(model, vocab, n, profile=(rnd == 0))
            results[n].append(r)
            print(f"round {rnd} {n:15s} " + "  ".join(
                f"bs={b}: lat {lat:.3f} host {host:.3f} wall {wall:.3f}" for b, (lat, host, wall) in r.items()), flush=True)
    print("\nsummary: latency ms per round (bs=1 | bs=8), ratio = inductor / variant, mean of rounds")
    base = {b: sum(r[b][0] for r in results["inductor"]) / 2 for b in (1, 8)}
    for n in names:
        lat = {b: [r[b][0] for r in results[n]] for b in (1, 8)}
        print(f"{n:15s} bs=1 {lat[1][0]:.3f}/{lat[1][1]:.3f} ({base[1] / (sum(lat[1]) / 2):.2f}x)   "
              f"bs=8 {lat[8][0]:.3f}/{lat[8][1]:.3f} ({base[8] / (sum(lat[8]) / 2):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
