"""GPU smoke check: the backend on CUDA, every lowering and mode, forward + backward.

    python scripts/gpu_smoke.py

Compiles TinyGPT in bf16 on the GPU with each configuration, runs a forward
and a backward, and compares with eager (relative error of the logits and of
the gradients). Exits non-zero on any mismatch or fallback. Correctness only:
speed is measured by the harness in bench/.
"""

from __future__ import annotations

import sys

import torch

from kp_compiler.core.report import collect
from kp_compiler.testing.compare import grad_error, grads_of, rel_error
from kp_compiler.testing.models import TinyGPT

CONFIGS = [
    {"lowering": "inductor"},
    {"lowering": "eager"},
    {"mode": "reduce-overhead"},
    {"mode": "max-autotune-no-cudagraphs"},
]


def run(config: dict, model: TinyGPT, idx: torch.Tensor) -> tuple[float, float, list]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", options=config)
    grads = {}
    outs = {}
    with collect() as records:
        for name, fn in (("eager", model), ("compiled", compiled)):
            for _ in range(3):  # CUDA graphs record on a later call
                model.zero_grad(set_to_none=True)
                out = fn(idx)
                torch.nn.functional.cross_entropy(out.float().flatten(0, 1), idx.flatten()).backward()
            outs[name] = out.detach().clone()
            grads[name] = grads_of(model.named_parameters())
    g_err = grad_error(grads["compiled"], grads["eager"])  # inf if a gradient is lost
    return rel_error([outs["compiled"]], [outs["eager"]]), g_err, records


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    model = TinyGPT(vocab=512, d=256, heads=8, layers=2, max_len=256).cuda().to(torch.bfloat16)
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    ok = True
    for config in CONFIGS:
        f_err, g_err, records = run(config, model, idx)
        fallbacks = [f for r in records for f in r.fallbacks]
        lowerings = sorted({r.lowering for r in records})
        good = f_err < 2e-2 and g_err < 5e-2 and not fallbacks and records
        ok &= bool(good)
        print(f"{str(config):45s} graphs={len(records)} lowering={lowerings} "
              f"fwd rel err={f_err:.2e} grad rel err={g_err:.2e} {'OK' if good else 'FAIL'} {fallbacks or ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
