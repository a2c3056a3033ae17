"""Issue 17 diagnostics: the host cost of calling ``kp::routed_experts`` through the dispatcher with its 3 x E
weight tensors, against the same CUDA function called directly and through an op that takes no weight lists
(a test op holding them in a closure, as an op reading address tables would). Decode shape (T=64, d=2048,
f=768, E=64, top-8) and T=4096. Variants interleaved over 7 rounds, host time per call back to back (median
of rounds). Not a benchmark.
    PYTHONPATH=. python scripts/gpu_moe_dispatch.py
"""

from __future__ import annotations

import statistics

import torch

from bench.timing import host_per_call
import kp_compiler.lowering.moe as moe
from kp_compiler.testing.models import LoopMoE


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for T in (64, 4096):
        torch.manual_seed(0)
        model = LoopMoE(2048, 768, 64, 8).cuda().bfloat16()
        x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            probs = torch.softmax(model.router(x).float(), -1)
            w, ids = torch.topk(probs, 8)
            w = (w / w.sum(-1, keepdim=True)).bfloat16()
        G, U, D = ([getattr(m, r).weight for m in model.experts] for r in ("gate", "up", "down"))
        lib = torch.library.Library("kpdiag", "FRAGMENT")
        lib.define(f"closure{T}(Tensor x, Tensor ids, Tensor weights, str activation) -> Tensor")
        lib.impl(f"closure{T}", lambda x, ids, ws, act: moe._cuda_forward(x, ids, ws, G, U, D, act), "CUDA")
        closure = getattr(torch.ops.kpdiag, f"closure{T}").default
        variants = {
            "torch.ops.kp.routed_experts": lambda: torch.ops.kp.routed_experts(x, ids, w, G, U, D, "silu"),
            "CUDA function directly": lambda: moe._cuda_forward(x, ids, w, G, U, D, "silu"),
            "op without weight lists": lambda: closure(x, ids, w, "silu"),
        }
        times = {k: [] for k in variants}
        with torch.no_grad():
            for r in range(7):
                for name, fn in (variants.items() if r % 2 == 0 else reversed(variants.items())):
                    times[name].append(host_per_call(fn, reps=100)[0])
        for name, ts in times.items():
            print(f"T={T} {name:30s} host {statistics.median(ts):.3f} ms per call (rounds {min(ts):.3f}-{max(ts):.3f})",
                  flush=True)


if __name__ == "__main__":
    main()
