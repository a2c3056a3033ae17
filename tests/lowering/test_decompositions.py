"""``lowering/decompositions.py``: training graphs with CUDA inputs keep ATen's embedding backward (Inductor's
decomposition makes an fp32 ``[V, d]`` buffer); everything else gets Inductor's own table. The CUDA condition
is forced on the CPU here, where ATen's CPU kernel then runs: the lowered backward is dumped and the gradients
compared with eager."""

import torch
from torch import nn

from kp_compiler.lowering import decompositions

AT = torch.ops.aten.embedding_dense_backward.default


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=3)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.emb(ids)).square().mean()


def test_the_table_drops_the_embedding_backward_only_for_cuda_training_graphs(monkeypatch):
    x = torch.randn(2, requires_grad=True)
    assert decompositions.table([x], {}) is None  # the CPU: Inductor's own
    monkeypatch.setattr(decompositions, "has_cuda_input", lambda xs: True)
    table = decompositions.table([x], {})
    from torch._inductor.decomposition import select_decomp_table
    full = select_decomp_table()
    assert AT in full and AT not in table and set(full) - set(table) == {AT}
    assert decompositions.table([torch.randn(2)], {}) is None  # no input needs a gradient: inference
    with torch.no_grad():
        assert decompositions.table([x], {}) is None


def _step(tmp_path, ids):
    torch.manual_seed(0)
    model = Embed()
    compiled = torch.compile(model, backend="kernelpytorch", options={"dump_dir": str(tmp_path)})
    compiled(ids).backward()
    return model, (tmp_path / "graph-000" / "lowered-backward.txt").read_text()


def test_the_kept_op_lowers_to_atens_kernel_with_eagers_gradients(tmp_path, monkeypatch):
    ids = torch.randint(0, 50, (4, 9))
    ids[0, :3] = 3  # the padding row gets no gradient
    ids[1, :] = 7  # one row gathered nine times
    _, inductors = _step(tmp_path / "inductor", ids)
    assert "embedding_dense_backward" not in inductors and "index_put" in inductors
    monkeypatch.setattr(decompositions, "has_cuda_input", lambda xs: True)
    model, kept = _step(tmp_path / "kept", ids)
    assert "aten.embedding_dense_backward.default" in kept and "index_put" not in kept
    torch.manual_seed(0)
    eager = Embed()
    eager(ids).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert model.emb.weight.grad[3].abs().sum() == 0
