"""FP8 cases (issue 7): kernelpytorch runs them with ``options={"fp8": True}`` (the case's ``kp_options``).

- ``fp8-linear-8192``: 8192^3 linear (target: at least 1.55x vs Inductor bf16);
- ``fp8-swiglu-mlp`` and ``-fwd-bwd``: Llama-3-8B-shaped SwiGLU MLP, 4096 -> 14336 -> 4096,
  8192 tokens (targets 1.4x forward, 1.3x forward+backward);
- ``fp8-linear-1024`` and ``fp8-linear-decode-16x4096x4096``: the cost model keeps them
  in bf16, so they must be no slower;
- ``fp8-llama2-train``: a training step (AdamW) of two Llama-8B-dims blocks (d=4096,
  ffn 14336, 32 heads / 8 KV heads, batch 2 x 2048 tokens, so M=4096 reaches the size
  table; K/V projections (N=1024) stay bf16). Target 1.2x.

Smoke runs (CPU, fp32) shrink every shape; there the table has no row, so
nothing converts and the cases only check that the wiring runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.testing.models import SwiGLU

from . import Scale, Workload, case

FP8 = {"fp8": True}


def _tokens(scale: Scale, m: int, k: int, train: bool = False) -> torch.Tensor:
    return torch.randn(m, k, device=scale.device, dtype=scale.dtype, requires_grad=train)


def _loss(out):
    return out.float().square().mean()


def _linear(scale: Scale, m: int, k: int, n: int) -> Workload:
    if scale.smoke:
        m, k, n = max(2, m // 128), k // 128, n // 128
    torch.manual_seed(0)
    model = nn.Linear(k, n, bias=False).to(scale.device, scale.dtype)
    return Workload(model, (_tokens(scale, m, k),), flops=2 * m * k * n, kp_options=FP8)


for _name, (_m, _k, _n) in {"fp8-linear-8192": (8192, 8192, 8192), "fp8-linear-1024": (1024, 1024, 1024),
                             "fp8-linear-decode-16x4096x4096": (16, 4096, 4096)}.items():
    case(_name, "fp8")(lambda scale, m=_m, k=_k, n=_n: _linear(scale, m, k, n))


def _mlp(scale: Scale, train: bool) -> Workload:
    t, d, f = (64, 32, 112) if scale.smoke else (8192, 4096, 14336)
    torch.manual_seed(0)
    model = SwiGLU(d, f).to(scale.device, scale.dtype)
    return Workload(model, (_tokens(scale, t, d, train),), flops=6 * t * d * f * (3 if train else 1),
                    loss=_loss if train else None, kp_options=FP8)


case("fp8-swiglu-mlp", "fp8")(lambda scale: _mlp(scale, False))
case("fp8-swiglu-mlp-fwd-bwd", "fp8", train=True)(lambda scale: _mlp(scale, True))


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * self.weight


class LlamaBlock(nn.Module):
    """Pre-norm attention (GQA, causal SDPA, no rotary: it has no GEMM) and a SwiGLU MLP."""

    def __init__(self, d: int, f: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp = SwiGLU(d, f)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.o_proj(a)
        return x + self.mlp(self.norm2(x))


class LlamaLayers(nn.Module):
    def __init__(self, layers: int, d: int, f: int, heads: int, kv_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(d, f, heads, kv_heads) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@case("fp8-llama2-train", "fp8", train=True)
def llama2_train(scale: Scale) -> Workload:
    b, s, d, f, heads, kv = (2, 16, 64, 224, 4, 2) if scale.smoke else (2, 2048, 4096, 14336, 32, 8)
    torch.manual_seed(0)
    model = LlamaLayers(2, d, f, heads, kv).to(scale.device, scale.dtype)
    x = torch.randn(b, s, d, device=scale.device, dtype=scale.dtype, requires_grad=True)
    hd = d // heads
    linear = 2 * b * s * d * (2 * d + 2 * kv * hd + 3 * f)
    attention = 4 * b * heads * hd * s * s / 2
    return Workload(model, (x,), flops=2 * 3 * (linear + attention), loss=_loss, kp_options=FP8,
                    note="2 Llama-3-8B-dims blocks, batch 2 x 2048, AdamW step")
