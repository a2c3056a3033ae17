"""Linear cases: linear + GELU(tanh) (the fusion anchor) and FP8-sized linears.

FLOPs 2*M*K*N. The FP8-sized shapes run in the working dtype today; the FP8
pass will decide per shape whether they convert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Scale, Workload, case


class LinearGelu(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.lin = nn.Linear(k, n)

    def forward(self, x):
        return F.gelu(self.lin(x), approximate="tanh")


def _linear(scale: Scale, m: int, k: int, n: int, module: nn.Module) -> Workload:
    torch.manual_seed(0)
    module = module.to(scale.device, scale.dtype)
    x = torch.randn(m, k, device=scale.device, dtype=scale.dtype)
    return Workload(module, (x,), flops=2 * m * k * n)


@case("linear-gelu", "linear")
def linear_gelu(scale: Scale) -> Workload:
    m, k, n = (64, 32, 64) if scale.smoke else (8192, 4096, 16384)
    return _linear(scale, m, k, n, LinearGelu(k, n))


FP8_SHAPES = {
    "linear-8192x8192x8192": (8192, 8192, 8192),
    "linear-4096x4096x14336": (4096, 4096, 14336),
    "linear-1024x1024x1024": (1024, 1024, 1024),
    "linear-decode-16x4096x4096": (16, 4096, 4096),
}

for _name, (_m, _k, _n) in FP8_SHAPES.items():
    case(_name, "fp8-sized")(
        lambda scale, m=_m, k=_k, n=_n: _linear(
            scale, *((max(2, m // 128), k // 128, n // 128) if scale.smoke else (m, k, n)),
            nn.Linear(*((k // 128, n // 128) if scale.smoke else (k, n)), bias=False)))
