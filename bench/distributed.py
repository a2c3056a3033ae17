"""``python -m bench.distributed``: a Llama-style training step on 2 processes under DDP, FSDP2 and tensor
parallelism (issue 21), every backend in one run.

The model: token embedding, blocks of RMSNorm, attention written by hand (q, k, v, o projections, heads from
the projection's width, a causal mask from ``tril``, softmax), RMSNorm and a SwiGLU MLP, a final norm and the
LM head; ``forward(ids)`` returns the next-token loss. GPU: 8 layers, d=2048, 16 heads, ffn 5632, vocabulary
32000, batch 4 x 1024 per rank, bf16; ``--smoke``: d=32, 2 layers, vocabulary 64, batch 2 x 16, fp32, on the
CPU with gloo. Wrappings:

- ``ddp``: ``DistributedDataParallel``;
- ``fsdp2``: ``fully_shard`` per block and on the root;
- ``tp``: ``parallelize_module`` per block, q/k/v and gate/up colwise, o and down rowwise (heads and MLP
  columns split over the ranks);
- ``tp-hf`` (on request): transformers' ``LlamaForCausalLM`` at the same widths under transformers' own tensor
  parallelism (``bench/distributed_hf.py``).

``--seqs 1024 768 512`` cycles the sequence length over the steps (a batch of another length recompiles once
with symbolic sizes: automatic dynamic); tokens/s then counts the mean length.

Per wrapping and backend (``eager``, ``inductor``, ``kernelpytorch``, and on CUDA ``kernelpytorch-fp8`` with
``options={"fp8": True}``; on request ``kernelpytorch-fp8-all``: every block linear, and under FSDP2
``kernelpytorch-fp8-gather``: FP8 with the block weights all-gathered in FP8), from the same seed and the
same per-rank batches (one batch for all ranks under TP), on ``--world`` processes (default 2): the loss of
every step (rank 0), the median step time after ``--warmup`` steps (synchronized per step), tokens per second
(over the ranks' batches; under TP the ranks share one batch), the peak memory of each rank, and the rewrites
that fired on each rank (one entry where the ranks agree). The loss ratio to eager is the mean over steps of
``loss / eager loss``. Rank 0 prints each row as it finishes (``progress``), before the table.

    python -m bench.distributed --steps 50 --out bench/results --stem 2026-12-03-h200x2-distributed

``--ac`` checkpoints every block (non-reentrant ``checkpoint_wrapper``, torchtitan's order: after the TP plan,
before FSDP2 and DDP).

``--comm gloo`` on a machine with fewer GPUs than ranks puts the ranks on the GPUs there are and communicates
through gloo (host memory): the losses are those of the sharded runs on the GPU kernels, the step times are
not a speed comparison (the table leaves out the ratio to Inductor).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

CONFIGS = ("ddp", "fsdp2", "tp")
EXTRA_CONFIGS = ("tp-hf",)  # needs transformers
BACKENDS = ("eager", "inductor", "kernelpytorch", "kernelpytorch-fp8")
# not a default: every block linear in FP8 whatever the size table says (the LM head excluded), to see the
# conversion under each wrapping at shapes where the table keeps bf16 (K or N below 4096 at this model's width)
EXTRA_BACKENDS = ("kernelpytorch-fp8-all", "kernelpytorch-fp8-gather")
# "kernelpytorch-fp8-gather" (FSDP2 only): options={"fp8": True} with the block linears' weights all-gathered
# in FP8 (kp_compiler.fp8.all_gather_in_fp8, scales precomputed after each step); select it where the size table
# converts every block linear
GPU_SHAPE = dict(vocab=32000, d=2048, layers=8, heads=16, ffn=5632, batch=4, seq=1024)
SMOKE_SHAPE = dict(vocab=64, d=32, layers=2, heads=4, ffn=64, batch=2, seq=16)
# Llama-3-8B's widths, 2 layers: where FP8 GEMMs pay (K and N >= 4096), for the FP8 rows
SHAPES = {"issue": GPU_SHAPE, "llama8b": dict(vocab=32000, d=4096, layers=2, heads=32, ffn=14336, batch=2, seq=2048)}


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.hd = d // heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(B, L, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, L, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaStyle(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ffn: int, **_):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, self.vocab), ids[:, 1:].reshape(-1))


def wrap(model: nn.Module, config: str, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    mesh_device = "cuda" if device.type == "cuda" else "cpu"
    if config == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(mesh_device, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if config == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh(mesh_device, (dist.get_world_size(),))
        plan = {name: ColwiseParallel() for name in ("q", "k", "v", "gate", "up")}
        plan.update({"o": RowwiseParallel(), "down": RowwiseParallel()})
        for block in model.blocks:
            parallelize_module(block, mesh, plan)
        return model
    raise ValueError(f"unknown configuration {config!r}; one of {CONFIGS}")


def _compiled(model, backend: str):
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, backend="inductor")
    if backend == "kernelpytorch":
        return torch.compile(model, backend="kernelpytorch")
    if backend in ("kernelpytorch-fp8", "kernelpytorch-fp8-gather"):
        return torch.compile(model, backend="kernelpytorch", options={"fp8": True})
    if backend == "kernelpytorch-fp8-all":
        fp8 = {"min_dims": [1, 1, 1], "exclude": ["*head*"]}
        return torch.compile(model, backend="kernelpytorch", options={"fp8": fp8})
    raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS + EXTRA_BACKENDS}")


def _optimizers(model, device) -> list:
    """AdamW, fused on CUDA; under TP one for the DTensor parameters and one for the plain ones (the norms, the
    embedding, the head): a fused step refuses a mix of the two."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [torch.optim.AdamW(g, lr=3e-4, fused=device.type == "cuda") for g in groups if g]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_blocks(model: nn.Module) -> None:
    """Each block activation-checkpointed (non-reentrant ``checkpoint_wrapper``, as torchtitan's full activation
    checkpointing wraps them)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    model.blocks = nn.ModuleList(checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                                 for b in model.blocks)


def build(config: str, backend: str, shape: dict, device, dtype, ac: bool = False) -> tuple:
    """``(model, optimizers, compiled model)`` for one row, from seed 0 (after ``torch._dynamo.reset()``);
    ``ac``: every block activation-checkpointed (torchtitan's order: after TP, before FSDP2 and DDP)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if config == "tp-hf":
        from torch.distributed.device_mesh import init_device_mesh

        from .distributed_hf import llama_tp
        mesh = init_device_mesh("cuda" if device.type == "cuda" else "cpu", (dist.get_world_size(),))
        model = llama_tp(shape, mesh, device, dtype)
        return model, _optimizers(model, device), _compiled(model, backend)
    if ac and config == "tp-hf":
        raise ValueError("--ac is for the Llama-style configs (ddp, fsdp2, tp)")
    model = LlamaStyle(**shape).to(device, dtype)
    if backend == "kernelpytorch-fp8-gather":
        import kp_compiler
        kp_compiler.fp8.all_gather_in_fp8(model, include=["blocks.*"])
    if ac and config != "tp":
        checkpoint_blocks(model)
    model = wrap(model, config, device)
    if ac and config == "tp":
        checkpoint_blocks(model)
    return model, _optimizers(model, device), _compiled(model, backend)


def run_one(config: str, backend: str, shape: dict, steps: int, warmup: int, device, dtype, seqs=None,
            ac: bool = False) -> dict:
    from kp_compiler.core.report import collect

    model, opts, step = build(config, backend, shape, device, dtype, ac)
    # data parallel: a batch per rank; tensor parallel: one batch for the group (TP's replicated values assume it)
    data = torch.Generator().manual_seed(1000 + (0 if config.startswith("tp") else dist.get_rank()))
    seqs = seqs or [shape["seq"]]
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with collect() as records:
        for i in range(steps):
            ids = torch.randint(0, shape["vocab"], (shape["batch"], seqs[i % len(seqs)]), generator=data).to(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = step(ids)
            loss.backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if backend == "kernelpytorch-fp8-gather":  # the next all-gathers' scales in one all-reduce
                import kp_compiler
                kp_compiler.fp8.precompute_all_gather_scales(model)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            losses.append(float(loss.detach()))
    fired: dict = {}
    for rec in records:
        for p in rec.passes:
            if p.matches:
                fired[p.name] = fired.get(p.name, 0) + p.matches
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"losses": losses, "median_ms": statistics.median(times) if times else None, "peak_gib": peak,
            "fired": fired, "fallbacks": sorted({f for rec in records for f in rec.fallbacks})}


def placement(rank: int, world: int, comm: str, smoke: bool, gpus: int) -> tuple:
    """``(device, process-group backend)`` of one rank. ``comm="nccl"`` (the default on CUDA): one GPU per rank,
    NCCL. ``comm="gloo"``: the ranks share the GPUs there are (rank ``r`` on GPU ``r % gpus``) and communicate
    through gloo, which copies every CUDA tensor through host memory: the ranks compute on sharded shapes with
    the GPU kernels, so losses are real, but step times include host-routed communication on a shared GPU and
    say nothing about NCCL. Without GPUs enough for NCCL, or with ``smoke``, the CPU with gloo."""
    if comm not in ("nccl", "gloo"):
        raise ValueError(f"unknown comm {comm!r}; 'nccl' or 'gloo'")
    if smoke or gpus == 0 or (comm == "nccl" and gpus < world):
        return torch.device("cpu"), "gloo"
    return torch.device("cuda", rank % gpus), comm


def _worker(rank: int, world: int, folder: str, args: dict) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, backend = placement(rank, world, args.get("comm") or "nccl", args["smoke"], gpus)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    shape = SMOKE_SHAPE if args["smoke"] else SHAPES[args["shape"]]
    dtype = torch.float32 if args["smoke"] else torch.bfloat16
    rows = []
    try:
        for config in args["configs"]:
            for backend in args["backends"]:
                if backend.startswith("kernelpytorch-fp8") and not cuda:
                    continue
                if backend == "kernelpytorch-fp8-gather" and config != "fsdp2":
                    continue
                try:
                    row = run_one(config, backend, shape, args["steps"], args["warmup"], device, dtype,
                                  args.get("seqs"), args.get("ac", False))
                except Exception as e:  # noqa: BLE001 - a failed row is a result, the other rows still run
                    row = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                gathered = [None] * world
                dist.all_gather_object(gathered, row)
                rows.append({"config": config, "backend": backend, "ranks": gathered})
                if rank == 0:
                    print(progress(config, backend, row), flush=True)
                dist.barrier()
    finally:
        if rank == 0:
            with open(os.path.join(folder, "rows.json"), "w") as f:
                json.dump({"shape": shape, "dtype": str(dtype), "device": str(device.type), "world": world,
                           "comm": backend, "gpus": gpus if cuda else 0, "seqs": args.get("seqs"),
                           "ac": args.get("ac", False), "rows": rows}, f)
        dist.destroy_process_group()


def progress(config: str, backend: str, row: dict) -> str:
    """One line per finished row on rank 0, printed at once: a run cut short (a time limit) still shows the rows
    it finished, with their losses."""
    if "failed" in row:
        return f"row {config} {backend}: failed: {row['failed']}"
    losses = " ".join(f"{x:.4f}" for x in row["losses"])
    ms = "n/a" if row.get("median_ms") is None else f"{row['median_ms']:.3f} ms"
    return f"row {config} {backend}: median {ms}; losses {losses}"


def summarize(result: dict) -> list[dict]:
    """Per row: step time, tokens/s over the ranks, peak memory per rank, loss ratio to eager, rewrites."""
    shape, world = result["shape"], result["world"]
    eager = {r["config"]: r["ranks"][0].get("losses") for r in result["rows"] if r["backend"] == "eager"}
    out = []
    for r in result["rows"]:
        first = r["ranks"][0]
        row = {"config": r["config"], "backend": r["backend"]}
        if "failed" in first:
            row["failed"] = first["failed"]
            out.append(row)
            continue
        ms = first["median_ms"]
        batches = 1 if r["config"].startswith("tp") else world  # tensor parallel: the ranks share one batch
        seq = statistics.mean(result.get("seqs") or [shape["seq"]])
        row.update(median_ms=ms, fired=first["fired"], fallbacks=first["fallbacks"],
                   fired_per_rank=[rank.get("fired", {}) for rank in r["ranks"]],
                   fallbacks_per_rank=[rank.get("fallbacks", []) for rank in r["ranks"]],
                   peak_gib=[rank.get("peak_gib") for rank in r["ranks"]], final_loss=first["losses"][-1],
                   tokens_per_s=(batches * shape["batch"] * seq / (ms / 1e3)) if ms else None)
        ref = eager.get(r["config"])
        if ref:
            row["loss_ratio"] = statistics.mean(a / b for a, b in zip(first["losses"], ref))
            row["max_deviation"] = max(abs(a / b - 1) for a, b in zip(first["losses"], ref))
        out.append(row)
    return out


def per_rank(values: list, show) -> str:
    """One text for every rank when all ranks agree, else ``rank 0: ...; rank 1: ...`` (what each rewrote)."""
    texts = [show(v) for v in values]
    if len(set(texts)) <= 1:
        return texts[0] if texts else ""
    return "; ".join(f"rank {i}: {t or 'none'}" for i, t in enumerate(texts))


def markdown(rows: list[dict], result: dict) -> str:
    inductor = {r["config"]: r.get("median_ms") for r in rows if r["backend"] == "inductor"}
    lines = [f"# Distributed training step: {result['world']} ranks, {result['device']}, {result['dtype']}, "
             f"shape {result['shape']}" + (", every block activation-checkpointed" if result.get("ac") else ""), ""]
    if result["device"] == "cuda" and result.get("comm") == "gloo":
        lines += [f"Communication through gloo (host memory), {result['world']} ranks on {result['gpus']} GPU(s): "
                  "the losses are those of the sharded runs; the step times are not NCCL's and not a speed "
                  "comparison.", ""]
    timed = not (result["device"] == "cuda" and result.get("comm") == "gloo")
    lines += ["| config | backend | median step ms | vs inductor | tokens/s | peak GiB per rank | loss ratio to eager "
              "| largest step deviation from eager | final loss | rewrites (per rank where they differ) | fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['config']} | {r['backend']} | failed: {r['failed']} | | | | | | | | |")
            continue
        base = inductor.get(r["config"])
        speed = f"{base / r['median_ms']:.2f}x" if timed and base and r["median_ms"] else ""
        peak = " / ".join(f"{p:.2f}" for p in r["peak_gib"] if p is not None)
        lines.append(f"| {r['config']} | {r['backend']} | {r['median_ms']:.3f} | {speed} | {r['tokens_per_s']:.0f} "
                     f"| {peak} | {r.get('loss_ratio', float('nan')):.4f} | {r.get('max_deviation', float('nan')):.2e} "
                     f"| {r['final_loss']:.4f} "
                     f"| {per_rank(r['fired_per_rank'], lambda f: ', '.join(f'{k} x{v}' for k, v in f.items()))} "
                     f"| {per_rank(r['fallbacks_per_rank'], '; '.join)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + EXTRA_CONFIGS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS + EXTRA_BACKENDS)
    p.add_argument("--world", type=int, default=2, help="processes (one GPU each on CUDA)")
    p.add_argument("--shape", default="issue", choices=sorted(SHAPES), help="the GPU model's widths")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths cycled over the steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU (gloo)")
    p.add_argument("--ac", action="store_true", help="every block activation-checkpointed (not with tp-hf)")
    p.add_argument("--comm", default="nccl", choices=("nccl", "gloo"),
                   help="on CUDA: 'gloo' lets the ranks share fewer GPUs than ranks (losses only, not speed)")
    p.add_argument("--out", default=None)
    p.add_argument("--stem", default="distributed")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.world, folder, vars(args)), nprocs=args.world, join=True)
        with open(os.path.join(folder, "rows.json")) as f:
            result = json.load(f)
    rows = summarize(result)
    text = markdown(rows, result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.stem}.json"), "w") as f:
            json.dump({**result, "summary": rows}, f, indent=1)
        with open(os.path.join(args.out, f"{args.stem}.md"), "w") as f:
            f.write(text)
    return {**result, "summary": rows}


if __name__ == "__main__":
    main()
