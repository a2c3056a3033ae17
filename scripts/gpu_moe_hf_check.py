"""GPU check of transformers' Qwen3-MoE (tiny config, default grouped_mm experts) with the rewrite forced.

    PYTHONPATH=. python scripts/gpu_moe_hf_check.py

``KP_MOE_REWRITE_GROUPED_MM=1``, bf16, the 3-D expert roles read in place by
the Triton forward and the grouped_mm backward: logits and a training step's
gradients against a float32 eager reference, next to eager bf16's own error
(at most 2x plus a small floor). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

from kp_compiler.core.report import collect
from kp_compiler.testing import hf

os.environ["KP_MOE_REWRITE_GROUPED_MM"] = "1"


def err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> bool:
    ok = True
    torch.manual_seed(0)
    model, vocab = hf.build("qwen3_moe", "tiny", attn=None, experts=None)
    ref = hf.build("qwen3_moe", "tiny", attn=None, experts=None)[0]
    ref.load_state_dict(model.state_dict())
    model, ref = model.cuda().bfloat16().train(), ref.cuda().train()
    step = torch.compile(lambda i: model(i, labels=i).loss, backend="kernelpytorch")
    ids = torch.randint(0, vocab, (4, 64), device="cuda")
    with collect() as records:
        loss = step(ids)
    loss.backward()
    rewrites = {k: v for r in records for p in r.passes if p.name == "moe-dispatch" for k, v in p.by_rule.items()}
    print("moe-dispatch:", rewrites)
    ok &= sum(rewrites.values()) == model.config.num_hidden_layers
    runs = {}
    for name, dtype in (("ref", torch.float32), ("eager", torch.bfloat16)):
        ref.to(dtype).zero_grad(set_to_none=True)
        out = ref(ids, labels=ids)
        out.loss.backward()
        runs[name] = (out.loss.detach(), {n: p.grad for n, p in ref.named_parameters()})
    e, e0 = err(loss.detach(), runs["ref"][0]), err(runs["eager"][0], runs["ref"][0])
    print(f"loss: kernelpytorch {e:.2e}, eager bf16 {e0:.2e}")
    ok &= e <= 2 * e0 + 1e-3
    for n, p in model.named_parameters():
        if "experts" not in n and "embed" not in n:
            continue
        g, r, g0 = p.grad, runs["ref"][1][n], runs["eager"][1][n]
        if g is None or r is None:
            print(f"{n}: gradient None (kernelpytorch {g is None}, reference {r is None})")
            ok = False
            continue
        e, e0 = err(g, r), err(g0, r)
        good = e <= 2 * e0 + 1e-3
        print(f"{n}: kernelpytorch {e:.2e}, eager bf16 {e0:.2e} {'ok' if good else 'MISMATCH'}")
        ok &= good
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
