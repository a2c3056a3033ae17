"""One rank of the 4-process CPU (gloo) run in ``test_gloo_2d.py``: ``TinyGPT`` (``worker.build``) on a 2 x 2 mesh,
tensor parallel over ``tp`` (q, k, v and fc1 colwise; proj and fc2 rowwise) and FSDP2 over ``dp`` per block and
at the root, trained a few SGD steps eagerly and then compiled with ``backend="kernelpytorch"``; each ``dp``
group feeds its own batches, the two ranks of a ``tp`` group the same. Saves the losses, the final parameters
(full tensors) and what the backend did per graph."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kp_compiler.core.report import collect

from . import worker

STEPS = 3


def _model(mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = worker.build()
    plan = {f"attn.{p}": ColwiseParallel() for p in "qkv"}
    plan.update({"attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], plan)
        fully_shard(block, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


def _train(mesh, compiled: bool) -> dict:
    torch._dynamo.reset()
    model = _model(mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = torch.compile(model, backend="kernelpytorch") if compiled else model
    data = torch.Generator().manual_seed(100 + mesh["dp"].get_local_rank())
    losses = []
    with collect() as records:
        for _ in range(STEPS):
            idx = torch.randint(0, worker.VOCAB, (2, worker.T), generator=data)
            out = forward(idx)
            loss = F.cross_entropy(out[:, :-1].reshape(-1, worker.VOCAB), idx[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
    return {"losses": losses, "params": {n: worker._full(p) for n, p in model.named_parameters()},
            "graphs": [{"parts": r.parts, "fallbacks": list(r.fallbacks),
                        "passes": {p.name: p.matches for p in r.passes if p.matches}} for r in records]}


def main(rank: int, world: int, folder: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        results = {"eager": _train(mesh, False), "kernelpytorch": _train(mesh, True)}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
