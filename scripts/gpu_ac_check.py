"""What kernelpytorch does inside activation-checkpointed transformers layers on the GPU: one training step of
each model (bf16, transformers' gradient checkpointing, non-reentrant) compiled with the default options, the
passes that fired, each checkpoint body's record, and the loss and gradients against eager.

    PYTHONPATH=. python scripts/gpu_ac_check.py [tiny|suite|...] [--attempts]
"""

from __future__ import annotations

import sys

import torch

from kp_compiler.core.report import collect
from kp_compiler.testing import hf


def check(name: str, attn, scale: str) -> None:
    torch.manual_seed(0)
    model, vocab = hf.build(name, scale, attn=attn, experts=None)
    model = model.cuda().to(torch.bfloat16)
    ref, _ = hf.build(name, scale, attn=attn, experts=None)
    ref = ref.cuda().to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = torch.randint(0, vocab, (2, 1024), device="cuda")
    compiled = torch.compile(model, backend="kernelpytorch")
    with collect() as records:
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    want = ref(input_ids=ids, labels=ids).loss
    want.backward()
    worst = max(((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
                for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None and q.grad.norm() > 0)
    print(f"{name} attn={attn}: loss {loss.item():.5f} eager {want.item():.5f}; worst relative gradient error "
          f"{worst:.3e}")
    for r in records:
        print("  graph", r.id, [(p.name, p.matches) for p in r.passes if p.matches], "skipped",
              [s["pass"] + ": " + s["reason"][:120] for s in r.skipped][:3], "fallbacks", r.fallbacks)
        for c in r.checkpoints:
            print("    checkpoint", c)


def show_attempts() -> None:
    """Print what the attention passes said on every try at every body (``--attempts``), kept or not."""
    from kp_compiler.core import checkpoint_bodies

    rewrite = checkpoint_bodies.rewrite

    def traced(cgm, run, *args, **kwargs):
        def run_and_show(body, fakes, reals):
            manager = run(body, fakes, reals)
            print("    try:", [(p.name, p.matches, p.notes[:2]) for p in manager.record.passes
                               if p.name.startswith("attention")])
            return manager
        return rewrite(cgm, run_and_show, *args, **kwargs)

    checkpoint_bodies.rewrite = traced


if __name__ == "__main__":
    if "--attempts" in sys.argv:
        sys.argv.remove("--attempts")
        show_attempts()
    scale = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    check("llama3", None, scale)  # transformers' default: sdpa
    check("gemma2", "eager", scale)  # softcapped attention
