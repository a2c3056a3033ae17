"""MoE micro cases: one ``LoopMoE`` layer (router softmax, top-k, SwiGLU experts).

The anchors' three shapes; smoke T=32 d=16 f=32 E=4 top-2. FLOPs are the
routed experts' useful work, 2*T*k*3*d*f forward (3x for forward+backward);
bytes are the expert weights read once (the decode floor).
"""

from __future__ import annotations

import torch

from kp_compiler.testing.models import LoopMoE

from . import Scale, Workload, case

SHAPES = {
    "moe-e8-top2": dict(T=8192, d=2048, f=5632, E=8, k=2),
    "moe-e64-top8": dict(T=4096, d=2048, f=768, E=64, k=8),
    "moe-e64-top8-decode": dict(T=64, d=2048, f=768, E=64, k=8),
}
SMOKE = dict(T=32, d=16, f=32, E=4, k=2)


def _build(shape: dict, scale: Scale, train: bool) -> Workload:
    s = SMOKE if scale.smoke else shape
    torch.manual_seed(0)
    layer = LoopMoE(s["d"], s["f"], s["E"], s["k"]).to(scale.device, scale.dtype)
    x = torch.randn(s["T"], s["d"], device=scale.device, dtype=scale.dtype, requires_grad=train)
    flops = 2 * s["T"] * s["k"] * 3 * s["d"] * s["f"] * (3 if train else 1)
    weight_bytes = s["E"] * 3 * s["d"] * s["f"] * torch.finfo(scale.dtype).bits // 8
    return Workload(
        layer, (x,), flops=flops, bytes=weight_bytes,
        loss=(lambda out: out.float().square().mean()) if train else None,
        dynamo_config={"capture_dynamic_output_shape_ops": True},
    )


for _name, _shape in SHAPES.items():
    for _train in (False, True):
        case(f"{_name}{'-fwd-bwd' if _train else ''}", "moe", train=_train)(
            lambda scale, shape=_shape, train=_train: _build(shape, scale, train))
