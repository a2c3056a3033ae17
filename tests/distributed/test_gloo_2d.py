"""Issue 21: FSDP2 x tensor parallelism on a 2 x 2 mesh of CPU processes (gloo). FSDP2 all-gathers each block's
parameters over ``dp`` into DTensors on the ``tp`` mesh, so the block graph holds the same column- and
row-parallel chains as under TP alone; they are computed on local shards (``passes/tp_linears.py``), the
attention becomes SDPA, and training equals eager on every rank."""

import pytest
import torch
import torch.distributed as dist

from . import worker_2d
from .spawn import run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(worker_2d.main, 4, str(tmp_path_factory.mktemp("gloo2d")))


def test_fsdp2_times_tp_trains_as_eager(results):
    for rank, res in enumerate(results):
        eager, kp = res["eager"], res["kernelpytorch"]
        torch.testing.assert_close(torch.stack(kp["losses"]), torch.stack(eager["losses"]), rtol=1e-4, atol=1e-5)
        assert len(eager["params"]) > 10
        for name, p in eager["params"].items():
            torch.testing.assert_close(kp["params"][name], p, rtol=1e-4, atol=1e-5, msg=f"rank {rank} {name}")
    # ranks 0, 1 form a tp group (one batch), ranks 0, 2 a dp group (their own batches)
    assert torch.equal(torch.stack(results[0]["eager"]["losses"]), torch.stack(results[1]["eager"]["losses"]))
    assert not torch.equal(torch.stack(results[0]["eager"]["losses"]), torch.stack(results[2]["eager"]["losses"]))


def test_the_block_graph_computes_its_sharded_linears_locally(results):
    for rank, res in enumerate(results):
        graphs = res["kernelpytorch"]["graphs"]
        assert not any(g["fallbacks"] for g in graphs), (rank, graphs)
        blocks = [g for g in graphs if g["parts"] is not None]
        assert len(blocks) == 1, (rank, graphs)  # the block graph, which both blocks run
        local = blocks[0]["parts"]["local_linears"]
        assert (local["colwise"], local["rowwise"], local["copies"], local["kept"]) == (4, 2, 2, []), (rank, local)
        assert blocks[0]["passes"].get("attention-to-sdpa") == 1, (rank, blocks[0]["passes"])
