"""Linear cases: linear + GELU(tanh) (the fusion anchor), the Llama-3-8B SwiGLU MLP in bf16 (issue 19), forward
and forward+backward, and FP8-sized linears.

FLOPs 2*M*K*N per linear (three times that for a forward+backward). The linear + activation pass is opt-in:
its rows need ``--kp-options '{"passes": [..., "linear-activation"]}'`` (``bench/gpu_run.sh linear-act``). The FP8-sized shapes run in the working dtype today; the FP8
pass will decide per shape whether they convert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.testing.models import SwiGLU

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


def _loss(out):
    return out.float().square().mean()


@case("linear-gelu-fwd-bwd", "linear", train=True)
def linear_gelu_train(scale: Scale) -> Workload:
    m, k, n = (64, 32, 64) if scale.smoke else (8192, 4096, 16384)
    work = _linear(scale, m, k, n, LinearGelu(k, n))
    x = work.inputs[0].requires_grad_()
    return Workload(work.model, (x,), flops=3 * work.flops, loss=_loss)


def _swiglu(scale: Scale, train: bool) -> Workload:
    t, d, f = (64, 32, 112) if scale.smoke else (8192, 4096, 14336)
    torch.manual_seed(0)
    model = SwiGLU(d, f).to(scale.device, scale.dtype)
    x = torch.randn(t, d, device=scale.device, dtype=scale.dtype, requires_grad=train)
    return Workload(model, (x,), flops=6 * t * d * f * (3 if train else 1), loss=_loss if train else None)


case("swiglu-mlp", "linear")(lambda scale: _swiglu(scale, False))
case("swiglu-mlp-fwd-bwd", "linear", train=True)(lambda scale: _swiglu(scale, True))


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
