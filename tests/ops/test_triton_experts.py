"""The fused Triton kernels of ``kp::routed_experts`` against the reference loop.

On a machine without a GPU they run in Triton's interpreter (``tests/conftest.py``),
so shapes are tiny; the kernels, masks, gathers and the pointer table are the
ones the GPU runs.
"""

import pytest
import torch

from kp_compiler.ops import triton_experts
from kp_compiler.ops.routed_experts import ACTIVATIONS, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(T, d, f, E, k, dtype, gated=True, idle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    ids = torch.stack([torch.randperm(E - 1 if idle else E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEVICE, dtype)

    def experts(rows, cols):
        return [(torch.randn(rows, cols, generator=g) / cols ** 0.5).to(DEVICE, dtype) for _ in range(E)]
    return x, ids, w, experts(f, d) if gated else [], experts(f, d), experts(d, f)


def error_vs_float64(out, x, ids, w, G, U, Dn, activation):
    def wide(ts):
        return [t.double() for t in ts]
    exact = reference(x.double(), ids, w.double(), wide(G), wide(U), wide(Dn), activation)
    return (out.double() - exact).abs().max().item(), exact


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_float32_equals_the_loop(activation, gated):
    args = make(12, 32, 48, 4, 2, torch.float32, gated)
    out = triton_experts.forward(*args, activation)
    err, exact = error_vs_float64(out, *args, activation)
    assert err < 1e-5 * exact.abs().max().item()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_bfloat16_is_as_close_as_the_eager_loop(activation):
    args = make(24, 32, 64, 4, 2, torch.bfloat16)
    out = triton_experts.forward(*args, activation)
    assert out.dtype is torch.bfloat16 and out.shape == args[0].shape
    err, _ = error_vs_float64(out, *args, activation)
    eager_err, _ = error_vs_float64(reference(*args, activation), *args, activation)
    assert err <= 2 * eager_err + 1e-3


@pytest.mark.parametrize("T,E,k", [(3, 8, 2), (200, 4, 2)])  # block 16 (decode-like) and block 64
def test_row_blocks_padding_and_idle_experts(T, E, k):
    args = make(T, 16, 32, E, k, torch.float32, idle=True, seed=T)
    assert triton_experts.block_rows(T * k, E) == (16 if T == 3 else 64)
    out = triton_experts.forward(*args, "silu")
    err, exact = error_vs_float64(out, *args, "silu")
    assert err < 1e-5 * exact.abs().max().item()


def test_experts_as_slices_of_3d_parameters_are_read_in_place():
    x, ids, w, _, _, _ = make(10, 16, 32, 4, 2, torch.float32)
    gate, up, down = (torch.randn(*shape).to(DEVICE) for shape in ((4, 32, 16), (4, 32, 16), (4, 16, 32)))
    G, U, Dn = list(gate), list(up), list(down)
    assert triton_experts.supported(x, G, U, Dn)
    out = triton_experts.forward(x, ids, w, G, U, Dn, "silu")
    err, exact = error_vs_float64(out, x, ids, w, G, U, Dn, "silu")
    assert err < 1e-5 * exact.abs().max().item()


def test_weights_of_different_layouts_are_not_supported():
    x, ids, w, G, U, Dn = make(10, 16, 32, 4, 2, torch.float32)
    assert triton_experts.supported(x, G, U, Dn)
    assert not triton_experts.supported(x, G, [U[0].t().contiguous().t(), *U[1:]], Dn)  # column-major expert
    assert not triton_experts.supported(x, G, U, [Dn[0].double(), *Dn[1:]])


def test_stacked_halves_of_one_gate_up_parameter():
    """The views moe-dispatch emits for transformers' gate_up [E, 2f, d]: expert stride 2f*d."""
    from kp_compiler.ops.routed_experts import per_expert

    x, ids, w, _, _, Dn = make(10, 16, 32, 4, 2, torch.float32)
    gate_up = (torch.randn(4, 64, 16) / 4).to(DEVICE)
    G, U = per_expert([gate_up[:, :32]]), per_expert([gate_up[:, 32:]])
    assert triton_experts.supported(x, G, U, Dn)
    out = triton_experts.forward(x, ids, w, G, U, Dn, "silu")
    err, exact = error_vs_float64(out, x, ids, w, G, U, Dn, "silu")
    assert err < 1e-5 * exact.abs().max().item()


def test_3d_roles_are_read_in_place_without_per_expert_views(monkeypatch):
    """transformers' gate_up [E, 2f, d] halves and down [E, d, f] given as 3-D roles: the same result as the
    per-expert views, the same address tables, and no unbind or select per call (host time)."""
    from kp_compiler.ops.routed_experts import per_expert

    x, ids, w, _, _, _ = make(10, 16, 32, 4, 2, torch.float32)
    gate_up, down = (torch.randn(4, 64, 16) / 4).to(DEVICE), (torch.randn(4, 16, 32) / 6).to(DEVICE)
    G, U, Dn = [gate_up[:, :32]], [gate_up[:, 32:]], [down]
    views = per_expert(G), per_expert(U), per_expert(Dn)
    assert triton_experts.supported(x, G, U, Dn)
    tables = triton_experts.expert_tables(x, G, U, Dn)
    for table, role in zip(tables, views):
        assert table.tolist() == [t.data_ptr() for t in role]
    want = triton_experts.forward(x, ids, w, *views, "silu")
    calls = []
    for name in ("unbind", "select"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    got = triton_experts.forward(x, ids, w, G, U, Dn, "silu")
    monkeypatch.undo()
    assert calls == []
    torch.testing.assert_close(got, want)
    assert not triton_experts.supported(x, G, [gate_up[:, 32:].transpose(1, 2)], Dn)  # column-major rows


@pytest.mark.parametrize("gated", [True, False])
def test_biases_in_the_epilogues(gated):
    x, ids, w, G, U, Dn = make(12, 16, 32, 4, 2, torch.float32, gated)
    g = torch.Generator().manual_seed(5)
    biases = ([torch.randn(32, generator=g).to(DEVICE) for _ in range(4)] if gated else [],
              [torch.randn(32, generator=g).to(DEVICE) for _ in range(4)],
              [torch.randn(16, generator=g).to(DEVICE) for _ in range(4)])
    assert triton_experts.bias_tables(x, biases) is not None
    out = triton_experts.forward(x, ids, w, G, U, Dn, "gelu", biases=biases)
    wide = lambda ts: [t.double() for t in ts]
    exact = reference(x.double(), ids, w.double(), wide(G), wide(U), wide(Dn), "gelu", tuple(wide(b) for b in biases))
    assert (out.double() - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
    assert triton_experts.bias_tables(x, ([], [b.double() for b in biases[1]], [])) is None  # wrong dtype


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T,E,k", [(3, 8, 2), (40, 4, 2)])  # padding rows at decode size, and idle experts
def test_saved_pre_activations_equal_the_grouped_paths(T, E, k, gated):
    """``save=True`` writes each assignment's gate/up pre-activations at its row of the sort by expert, as
    ``grouped_experts.forward(save=True)`` does (what ``kp::routed_experts_train``'s backward reads)."""
    from kp_compiler.ops import grouped_experts

    x, ids, w, G, U, Dn = make(T, 16, 32, E, k, torch.float32, gated, idle=True, seed=T + E)
    out, saved = triton_experts.forward(x, ids, w, G, U, Dn, "silu", save=True)
    torch.testing.assert_close(out, triton_experts.forward(x, ids, w, G, U, Dn, "silu"), rtol=0, atol=0)
    want_out, want = grouped_experts.forward(x.cpu(), ids.cpu(), w.cpu(), [t.cpu() for t in G],
                                             [t.cpu() for t in U], [t.cpu() for t in Dn], "silu", save=True)
    assert saved.shape == want.shape
    torch.testing.assert_close(saved.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-5, atol=1e-5)
