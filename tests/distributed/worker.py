"""One rank of the 2-process CPU (gloo) runs in ``test_gloo.py``: a small nanoGPT-style model under DDP or
FSDP2, trained a few steps eagerly and then compiled with ``backend="kernelpytorch"``, from the same seed and
the same per-rank batches. Each rank saves, per run: the losses, the first step's gradients and the final
parameters (full tensors: FSDP2's shards gathered), and the rewrites that fired in the compiled run."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kp_compiler.core.report import collect
from kp_compiler.testing.models import TinyGPT

VOCAB, T, STEPS = 64, 16, 4


def _wrap(model, config: str):
    if config == "ddp":  # 1 MB buckets (the first bucket's size) over ~1.7 MB of parameters: Dynamo's DDPOptimizer splits the graph
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, bucket_cap_mb=1)
    if config == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    raise ValueError(config)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(config: str, compiled: bool, rank: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _wrap(TinyGPT(vocab=VOCAB, d=128, heads=4, layers=2, max_len=T), config)
    # SGD: the update is linear in the gradient. AdamW turns gradients that are zero up to rounding (the
    # attention's key bias: softmax ignores a per-row constant) into updates of +-lr, so runs that agree to
    # 1e-7 in every gradient would differ by lr in those parameters.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(model, backend="kernelpytorch") if compiled else model
    data = torch.Generator().manual_seed(100 + rank)
    out: dict = {"losses": []}
    with collect() as records:
        for i in range(STEPS):
            idx = torch.randint(0, VOCAB, (2, T), generator=data)
            loss = F.cross_entropy(step(idx)[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
            loss.backward()
            if i == 0:
                out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            out["losses"].append(loss.detach().clone())
    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    out["graphs"] = [{"lowering": r.lowering, "passes": [{"name": p.name, "matches": p.matches} for p in r.passes if p.matches],
                      "fallbacks": list(r.fallbacks)} for r in records]
    return out


def main(rank: int, world: int, folder: str, configs: list) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        results = {c: {"eager": _train(c, False, rank), "kernelpytorch": _train(c, True, rank)} for c in configs}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
