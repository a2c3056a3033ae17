"""The demo: compile a small GPT with the backend and compare it with eager.

    python -m kp_compiler.demo [--device cpu|cuda] [--lowering auto|inductor|eager]

Runs on the GPU when one is present, else on the CPU. Prints the ``explain``
table, then the largest difference from eager for the forward output and
for the gradients of a training step. The GPT keeps its causal mask in a
registered ``tril`` buffer (nanoGPT's style), so the demo passes
``constant_buffers=True``: the attention pass may then rely on the buffer's
value (under a version guard) and emit ``is_causal``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .explain import explain
from .testing.compare import grads_of, missing_grads
from .testing.models import TinyGPT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kp_compiler.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lowering", default="auto", choices=["auto", "inductor", "eager"])
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyGPT(vocab=256, d=64, heads=4, layers=2, max_len=128).to(args.device)
    idx = torch.randint(0, 256, (4, 96), device=args.device)
    print(f"torch {torch.__version__} on {args.device}: TinyGPT, 2 layers, d=64, batch 4 x 96 tokens\n")

    options = {"lowering": args.lowering, "constant_buffers": True}
    report = explain(model, idx, **options)
    print(report)

    compiled = torch.compile(model, backend="kernelpytorch", options=options)
    ref = model(idx)
    out = compiled(idx)
    fwd_err = (out - ref).abs().max().item()

    grads = {}
    for name, fn in (("eager", model), ("kernelpytorch", compiled)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fn(idx).flatten(0, 1), idx.flatten()).backward()
        grads[name] = grads_of(model.named_parameters())
    lost = missing_grads(grads["kernelpytorch"], grads["eager"])
    grad_err = float("inf") if lost else max(
        (a - grads["eager"][n]).abs().max().item() for n, a in grads["kernelpytorch"].items() if a is not None)
    if lost:
        print(f"gradients missing on one side: {lost}")

    tol = 1e-4
    ok = fwd_err < tol and grad_err < tol
    print(f"\nagreement with eager: forward max |diff| = {fwd_err:.2e}, gradients max |diff| = {grad_err:.2e}"
          f" (tolerance {tol:.0e}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
