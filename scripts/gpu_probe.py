"""GPU diagnostics left open by the 2026-11-23 session (run by ``bench/gpu_run.sh next``).

1. The model-zoo Mistral entry on CUDA (bf16, training step) had no
   ``attention-kernels`` step, while the same entry on the CPU lifts its
   sliding window. Print the passes and the mask subgraph the pass saw.
2. ``kp::routed_experts`` on CUDA (bf16): the grouped ``_grouped_mm`` path
   and the reference loop against a float64 reference, forward and gradients.
"""

from __future__ import annotations

import glob
import json
import tempfile

import torch


def mistral() -> None:
    from tests.zoo.entries import BY_NAME

    entry = BY_NAME["hf-mistral-sliding-window"]
    model = entry.build().to("cuda", torch.bfloat16)
    ids = torch.randint(0, entry.vocab, (2, 24), device="cuda")
    dump = tempfile.mkdtemp()
    out = torch.compile(model, backend="kernelpytorch", options={"dump_dir": dump})(ids).logits
    out.float().sum().backward()
    graph = json.load(open(f"{dump}/report.json"))["graphs"][0]
    print("mistral passes:", [(p["name"], p["matches"], p["status"], p["by_rule"]) for p in graph["passes"]])
    lines = open(glob.glob(f"{dump}/graph-000/02-*.txt")[0]).read().splitlines()
    keep = ("arange", "unsqueeze", "where", "masked_fill", " le", " gt", " lt", "and", "scaled_dot", "new_ones",
            "sub", "zeros", "add", "expand", "slice")
    print("\n".join(line[:240] for line in lines if "input()" not in line and any(k in line for k in keep))[:6000])


def routed_experts() -> None:
    import kp_compiler.lowering  # noqa: F401  (registers the CUDA implementation)
    from kp_compiler.ops.routed_experts import reference

    T, d, f, E, k = 512, 256, 384, 8, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=g)
    ids = torch.topk(torch.randn(T, E, device="cuda", generator=g), k).indices
    w = torch.rand(T, k, device="cuda", generator=g)
    G, U = ([torch.randn(f, d, device="cuda", generator=g) * 0.05 for _ in range(E)] for _ in range(2))
    Dn = [torch.randn(d, f, device="cuda", generator=g) * 0.05 for _ in range(E)]
    ref = reference(*(t.double() for t in (x,)), ids, w.double(), [t.double() for t in G],
                    [t.double() for t in U], [t.double() for t in Dn], "silu")
    for dtype in (torch.bfloat16, torch.float32):
        args = [x.to(dtype), ids, w.to(dtype), [t.to(dtype) for t in G], [t.to(dtype) for t in U],
                [t.to(dtype) for t in Dn], "silu"]
        got = torch.ops.kp.routed_experts(*args)
        loop = reference(*args)
        rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        print(f"routed_experts {dtype}: op rel error {rel(got):.2e}, loop rel error {rel(loop):.2e}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    for probe in (mistral, routed_experts):
        try:
            probe()
        except Exception as e:  # noqa: BLE001 - a diagnostic reports, it does not stop the call
            print(f"{probe.__name__} failed: {type(e).__name__}: {e}")
