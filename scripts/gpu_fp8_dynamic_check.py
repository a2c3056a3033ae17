"""FP8 under a dynamic token count on CUDA: transformers-style SwiGLU (bf16) compiled with ``dynamic=True``,
trained at four token counts with each ``casts`` value; prints the compiles, the guards the lowering added and the
error against eager per call (issue 19 check, not a benchmark).
    PYTHONPATH=. python scripts/gpu_fp8_dynamic_check.py
"""

from __future__ import annotations

import torch

from kp_compiler.core.report import collect
from kp_compiler.testing.models import SwiGLU


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    for casts in ("inductor", "ops"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = SwiGLU(1024, 2816).cuda().bfloat16()
        compiled = torch.compile(model, backend="kernelpytorch", dynamic=True,
                                 options={"fp8": {"min_dims": [16, 16, 16], "casts": casts}})
        with collect() as records:
            for m in (4096, 3000, 2048, 37):
                x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                out = compiled(x)
                out.float().square().mean().backward()
                ref_x = x.detach().clone().requires_grad_()
                ref = model(ref_x)
                ref.float().square().mean().backward()
                print(f"casts={casts} M={m}: out {rel(out, ref):.2e}, grad x {rel(x.grad, ref_x.grad):.2e}, "
                      f"graphs so far {len(records)}", flush=True)
        fired = [(p.name, p.matches) for r in records for p in r.passes if p.matches]
        print(f"casts={casts}: compiles {len(records)}, rewrites {fired}, "
              f"guards added {[g for r in records for g in r.guards_added]}", flush=True)


if __name__ == "__main__":
    main()
