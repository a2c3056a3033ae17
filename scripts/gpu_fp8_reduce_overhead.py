"""FP8 linears under ``mode="reduce-overhead"`` (CUDA graph trees) on CUDA: inference (``kp::fp8_linear``, its
Triton casts) and training (the decomposed ops), each against the same model compiled in default mode, over
three batch sizes and repeated calls (issue 19 check: a review found the casts' persistent amax workspace, since
removed, allocated in the graphs' memory pool). Prints the largest difference per call; not a benchmark.
    PYTHONPATH=. python scripts/gpu_fp8_reduce_overhead.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

FP8 = {"fp8": {"min_dims": [16, 16, 16]}}
RO = {**FP8, "mode": "reduce-overhead"}  # torch.compile takes mode or options, not both


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512, bias=False), nn.ReLU(), nn.Linear(512, 256, bias=False), nn.GELU(),
                         nn.Linear(256, 256, bias=False)).cuda().bfloat16()


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    base = model()
    ro = torch.compile(copy.deepcopy(base), backend="kernelpytorch", options=RO)
    ref = torch.compile(copy.deepcopy(base), backend="kernelpytorch", options=FP8)
    with torch.no_grad():
        for it in range(9):
            x = torch.randn([32, 64, 48][it % 3], 256, device="cuda", dtype=torch.bfloat16)
            y, r = ro(x).clone(), ref(x)
            torch.cuda.synchronize()
            print(f"inference call {it} rows {x.shape[0]}: max |diff| {(y.float() - r.float()).abs().max().item():.3e}",
                  flush=True)
    train_ro, train_ref = copy.deepcopy(base), copy.deepcopy(base)
    ro = torch.compile(train_ro, backend="kernelpytorch", options=RO)
    ref = torch.compile(train_ref, backend="kernelpytorch", options=FP8)
    for it in range(6):
        x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
        y, r = ro(x), ref(x)
        y.float().square().mean().backward()
        r.float().square().mean().backward()
        g = max((a.grad.float() - b.grad.float()).abs().max().item()
                for a, b in zip(train_ro.parameters(), train_ref.parameters()))
        print(f"training call {it}: max |diff| out {(y.float() - r.float()).abs().max().item():.3e}, grads {g:.3e}",
              flush=True)
        for p in (*train_ro.parameters(), *train_ref.parameters()):
            p.grad = None


if __name__ == "__main__":
    main()
