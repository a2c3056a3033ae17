"""``options["fp8"]["casts"]``: the decomposed training ops (``"inductor"``, the default) against the ops' own
kernels (``"ops"``) on CUDA, bf16 (issue 19 check, not a benchmark).

A block with a bias, a linear of its own input and two linears that share one (every training op the
``fp8-linear`` pass emits), at 37 tokens (the weight gradient pads them) and 4096; transformers' ``LlamaMLP``
when transformers is importable. Prints the relative error of the output and of every gradient between the
two, and against eager bf16, and whether the lowered graphs still call a ``kp.fp8`` op.
    PYTHONPATH=. python scripts/gpu_fp8_traced_check.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kp_compiler.core.report import collect

FP8 = {"min_dims": [16, 16, 16]}


class Block(nn.Module):
    def __init__(self, d=512, f=1024):
        super().__init__()
        self.q, self.k = nn.Linear(d, d, bias=True), nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.q(x)) + self.k(x))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step(model, x, casts):
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    x = x.detach().clone().requires_grad_()
    fp8 = None if casts is None else {**FP8, "casts": casts}
    fn = torch.compile(model, backend="kernelpytorch", options={"fp8": fp8, "strict": True}) if casts else model
    with collect() as records:
        out = fn(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [x, *model.parameters()], grad)
    notes = [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
    return out, grads, notes


def check(name, model, x):
    ops, ops_g, _ = step(model, x, "ops")
    dec, dec_g, notes = step(model, x, "inductor")
    eager, eager_g, _ = step(model, x, None)
    traced = any("casts']='inductor'" in n for n in notes)
    worst = max(rel(a, b) for a, b in zip(dec_g, ops_g))
    dec_eager = max(rel(a, b) for a, b in zip(dec_g, eager_g))
    ops_eager = max(rel(a, b) for a, b in zip(ops_g, eager_g))
    print(f"{name}: decomposed={traced} out vs ops {rel(dec, ops):.2e}, vs eager {rel(dec, eager):.2e} "
          f"(ops vs eager {rel(ops, eager):.2e}); grads vs ops worst {worst:.2e}, vs eager worst "
          f"{dec_eager:.2e} (ops {ops_eager:.2e})", flush=True)
    assert traced and all(g is not None for g in dec_g)


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    torch.manual_seed(0)
    block = Block().cuda().bfloat16()
    for m in (37, 4096):
        check(f"block {m} tokens", block, torch.randn(m, 512, device="cuda", dtype=torch.bfloat16))
    try:
        import transformers
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, hidden_act="silu", mlp_bias=False,
                                   num_attention_heads=8, num_key_value_heads=8)
    check("LlamaMLP 2x1024 tokens", LlamaMLP(cfg).cuda().bfloat16(),
          torch.randn(2, 1024, 1024, device="cuda", dtype=torch.bfloat16))


if __name__ == "__main__":
    main()
