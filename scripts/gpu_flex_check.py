"""GPU check of the attention rewrite: naive masked attention -> SDPA / FlexAttention on CUDA.

    python scripts/gpu_flex_check.py

For causal, sliding-window, document and ALiBi masks (bf16, B=2 H=4 S=1024
D=64), compiles the naive code with kernelpytorch, runs forward and
backward, and compares with a float64 eager reference against eager bf16's
own error. Prints the kernel each site got. Exits non-zero on a mismatch.
Correctness only: speed comes from bench/.
"""

from __future__ import annotations

import sys

import torch

from bench.cases import attention as cases
from kp_compiler.core.report import collect

CASES = {
    "causal": cases.causal,
    "sliding-window": cases.make_sliding_window(128),
    "documents": cases.make_documents(256),
    "alibi": cases.alibi,
}


def errors(fn, compiled, inputs):
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = fn(*ref_in)
    ref.square().sum().backward()
    result = {}
    for name, f in (("eager", fn), ("kp", compiled)):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = f(*xs)
        out.float().square().sum().backward()
        err = (out.double() - ref).abs().max().item()
        gerr = max((x.grad.double() - r.grad).abs().max().item() for x, r in zip(xs, ref_in))
        result[name] = (err, gerr)
    return result


def main() -> int:
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name())
    bad = 0
    for name, fn in CASES.items():
        torch._dynamo.reset()
        inputs = [torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        compiled = torch.compile(fn, backend="kernelpytorch")
        with collect() as records:
            e = errors(fn, compiled, inputs)
        passes = {p.name: (p.matches, p.by_rule, p.status) for r in records for p in r.passes}
        fallbacks = [f for r in records for f in r.fallbacks]
        ok = e["kp"][0] <= 2 * e["eager"][0] + 1e-3 and e["kp"][1] <= 2 * e["eager"][1] + 1e-3 and not fallbacks
        bad += not ok
        print(f"{name:15s} {'OK ' if ok else 'BAD'} fwd err kp {e['kp'][0]:.2e} eager-bf16 {e['eager'][0]:.2e} | "
              f"grad err kp {e['kp'][1]:.2e} eager-bf16 {e['eager'][1]:.2e} | {passes} {fallbacks}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
