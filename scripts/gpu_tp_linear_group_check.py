"""``linear-group`` on tensor-parallel shards (issue 21): a decode step of q, k, v column-parallel projections on
one GPU (NCCL, one rank), under ``mode="reduce-overhead"`` and ``torch.no_grad()``: the three local linears
become one ``kp::multi_linear``, and the outputs equal eager's over calls at 1, 2 and 4 rows.

    PYTHONPATH=. python scripts/gpu_tp_linear_group_check.py
"""

from __future__ import annotations

import datetime
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from kp_compiler.core.report import collect


class QKV(nn.Module):
    def __init__(self, d: int = 2048, kv: int = 512):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv, bias=False)
        self.v = nn.Linear(d, kv, bias=False)

    def forward(self, x):
        return self.q(x).float().sum(-1) + self.k(x).float().sum(-1) + self.v(x).float().sum(-1)


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cuda", (1,))
    torch.manual_seed(0)
    model = QKV().cuda().to(torch.bfloat16)
    parallelize_module(model, mesh, {name: ColwiseParallel() for name in ("q", "k", "v")})
    compiled = torch.compile(model, backend="kernelpytorch", mode="reduce-overhead")
    worst = 0.0
    with torch.no_grad(), collect() as records:
        for rows in (1, 2, 4, 1, 2):
            x = torch.randn(rows, 1, 2048, device="cuda", dtype=torch.bfloat16)
            out, ref = compiled(x), model(x)
            worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
    for r in records:
        fired = {p.name: (p.matches, dict(p.by_rule)) for p in r.passes if p.matches}
        notes = [n for p in r.passes if p.name == "linear-group" for n in p.notes]
        print(f"graph {r.id}: lowering {r.lowering}, fallbacks {r.fallbacks}, fired {fired}, "
              f"local {None if not r.parts else r.parts.get('local_linears')}, notes {notes}")
    print(f"worst relative error vs eager over 5 calls: {worst:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
