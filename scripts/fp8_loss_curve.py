"""Train a small GPT with bf16 and with FP8 (same seed, same data) and compare the loss curves.

    PYTHONPATH=. python3 scripts/fp8_loss_curve.py --out bench/results/fp8-loss        # H100, about 1-2 min
    PYTHONPATH=. python3 scripts/fp8_loss_curve.py --smoke --out /tmp/fp8-loss        # CPU, tiny, emulated

The model is ``kp_compiler.testing.models.TinyGPT`` (4 layers, d=1024, 16
heads, vocab 1024), batch 8 x 512 tokens, AdamW, ``--steps`` steps (300).
The data is a fixed random Markov chain over the vocabulary, so the loss has
somewhere to go. Both runs compile with ``backend="kernelpytorch"``; the FP8
run adds ``options={"fp8": {"recipe": ..., "min_dims": [4096, 1024, 1024]}}``
so the d=1024 layers convert (the H100 size table starts at 4096). The script
prints which linears converted, writes ``loss.json`` and ``loss.png`` under
``--out``, and prints the final-loss ratio (mean of the last 20 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from kp_compiler.core.report import collect
from kp_compiler.testing.models import TinyGPT


def batches(vocab: int, batch: int, seq: int, steps: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Each token has 4 likely successors: an entropy floor of about log(4) nats.
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)
    for _ in range(steps):
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(seq):
            ids[:, t + 1] = nxt[ids[:, t], torch.randint(0, 4, (batch,), generator=g)]
        yield ids[:, :-1].to(device), ids[:, 1:].to(device)


def train(fp8: dict | None, cfg: dict, device: str, dtype: torch.dtype) -> tuple[list, list]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["seq"]).to(device, dtype)
    options = {"fp8": fp8} if fp8 is not None else None
    run = torch.compile(model, backend="kernelpytorch", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    losses, notes = [], []
    for ids, targets in batches(cfg["vocab"], cfg["batch"], cfg["seq"], cfg["steps"], device):
        with collect() as records:
            logits = run(ids)
        notes += [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for loss.json and loss.png")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps, emulated FP8")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--recipe", default="tensorwise", choices=("tensorwise", "rowwise", "delayed"))
    p.add_argument("--casts", default=None, choices=("ops", "inductor"),
                   help="options['fp8']['casts'] (default: the option's default)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.smoke:
        cfg = dict(vocab=128, d=64, heads=4, layers=2, seq=32, batch=4, steps=min(args.steps, 6), lr=1e-3)
        fp8 = {"recipe": args.recipe, "emulate": True, "min_dims": [16, 16, 16]}
    else:
        cfg = dict(vocab=1024, d=1024, heads=16, layers=4, seq=512, batch=8, steps=args.steps, lr=3e-4)
        fp8 = {"recipe": args.recipe, "min_dims": [4096, 1024, 1024]}
    if args.casts is not None:
        fp8["casts"] = args.casts
    start = time.perf_counter()
    base, _ = train(None, cfg, device, dtype)
    mid = time.perf_counter()
    low, notes = train(fp8, cfg, device, dtype)
    end = time.perf_counter()
    converted = sorted({n for n in notes if ": converted" in n})
    kept = sorted({n for n in notes if ": kept" in n})
    print(f"device={device} dtype={dtype} steps={cfg['steps']} recipe={args.recipe} "
          f"casts={fp8.get('casts', 'default')} "
          f"bf16 run {mid - start:.1f} s, fp8 run {end - mid:.1f} s")
    print(f"linears converted ({len(converted)}):" + "".join(f"\n  {n}" for n in converted))
    print(f"linears kept ({len(kept)}):" + "".join(f"\n  {n}" for n in kept))
    tail = max(1, min(20, len(base) // 5))
    final_base, final_fp8 = sum(base[-tail:]) / tail, sum(low[-tail:]) / tail
    ratio = final_fp8 / final_base
    print(f"final loss (mean of last {tail} steps): baseline {final_base:.4f}, fp8 {final_fp8:.4f}, "
          f"ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                   "dtype": str(dtype), "config": cfg, "fp8": fp8, "converted": converted, "kept": kept,
                   "baseline": base, "fp8_loss": low, "final_ratio": ratio}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(base, label=f"{'bf16' if cuda else 'fp32'}")
    ax.plot(low, label=f"fp8 ({args.recipe})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"TinyGPT d={cfg['d']} x{cfg['layers']}: final ratio {ratio:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
    print(f"wrote {args.out}/loss.json, {args.out}/loss.png")
    return 0 if converted else 1


if __name__ == "__main__":
    sys.exit(main())
