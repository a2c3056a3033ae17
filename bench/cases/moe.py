"""MoE micro cases: one ``LoopMoE`` layer (router softmax, top-k, SwiGLU experts).

The anchors' three shapes; smoke T=32 d=16 f=32 E=4 top-2. FLOPs are the
routed experts' useful work, 2*T*k*3*d*f forward (3x for forward+backward);
bytes are the expert weights read once (the decode floor).
"""

from __future__ import annotations

import torch

from torch import nn

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

DECODE_TOKENS = (64, 40, 24, 8)  # one step of the dynamic decode case: these token counts in turn (issue 18)


@case("moe-e64-top8-decode-dynamic", "moe")
def _decode_dynamic(scale: Scale) -> Workload:
    """The decode layer at several token counts in one step, every dim dynamic: one symbolic graph (and, with
    ``options["cudagraph_buckets"]``, one CUDA graph per bucket) against Inductor's graph per size."""
    wl = _build(SHAPES["moe-e64-top8-decode"], scale, False)
    s = SMOKE if scale.smoke else SHAPES["moe-e64-top8-decode"]
    counts = (32, 20, 12, 4) if scale.smoke else DECODE_TOKENS
    g = torch.Generator(device=scale.device).manual_seed(1)
    sets = [(torch.randn(t, s["d"], device=scale.device, dtype=scale.dtype, generator=g),) for t in counts]
    wl.inputs, wl.more_inputs = sets[0], sets[1:]
    wl.flops = sum(2 * t * s["k"] * 3 * s["d"] * s["f"] for t in counts)
    wl.dynamo_config = {"capture_dynamic_output_shape_ops": True, "assume_static_by_default": False,
                        "automatic_dynamic_shapes": True}
    wl.note = f"one step = {counts} tokens, every dim dynamic"
    return wl


class GroupedMoE(nn.Module):
    """The anchors' ``torch._grouped_mm`` reference: the same layer with expert weights stored stacked
    ``[E, f, d]`` (so no per-call copy), tokens sorted by expert, three grouped GEMMs."""

    def __init__(self, loop: LoopMoE):
        super().__init__()
        self.top_k, self.router = loop.top_k, loop.router
        stack = lambda name: nn.Parameter(torch.stack([getattr(e, name).weight.detach() for e in loop.experts]))
        self.gate, self.up, self.down = stack("gate"), stack("up"), stack("down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.up.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // self.top_k]
        g = _grouped_mm(xs, self.gate.transpose(1, 2), offs)
        u = _grouped_mm(xs, self.up.transpose(1, 2), offs)
        y = _grouped_mm(torch.nn.functional.silu(g) * u, self.down.transpose(1, 2), offs)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add(0, order // self.top_k, y)


def _grouped_mm(a, b, offs):
    if a.dtype is torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    # the harness's float64 error reference and fp32 smoke runs: _grouped_mm compiles for bf16 only
    starts = torch.cat([offs.new_zeros(1), offs[:-1]]).tolist()
    return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, offs.tolist()))])


def _build_grouped(shape: dict, scale: Scale, train: bool) -> Workload:
    loop = _build(shape, scale, train)
    loop.model = GroupedMoE(loop.model)
    loop.dynamo_config = {}
    loop.note = "reference: torch._grouped_mm on stacked weights"
    return loop


for _name, _shape in SHAPES.items():
    for _train in (False, True):
        case(f"{_name.replace('moe-', 'moe-ref-grouped-mm-')}{'-fwd-bwd' if _train else ''}", "moe", train=_train)(
            lambda scale, shape=_shape, train=_train: _build_grouped(shape, scale, train))
