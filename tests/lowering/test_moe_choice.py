"""The routed-experts implementation table, and the grouped-GEMM path against the reference loop."""

import pytest
import torch

from kp_compiler.core.devices import DeviceInfo
from kp_compiler.lowering.moe import choose, choose_backward, fused_available
from kp_compiler.ops import grouped_experts
from kp_compiler.ops.routed_experts import ACTIVATIONS, reference, reference_backward

H100, A100 = DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (8, 0))


@pytest.mark.parametrize("device,dtype,aligned,uniform,triton,impl", [
    (H100, torch.bfloat16, True, True, True, "triton"),
    (H100, torch.float16, False, True, True, "triton"),
    (A100, torch.bfloat16, True, True, True, "triton"),
    (H100, torch.bfloat16, True, False, True, "grouped_mm"),  # experts of different layouts
    (H100, torch.bfloat16, True, True, False, "grouped_mm"),  # Triton not installed
    (H100, torch.bfloat16, False, False, True, "reference"),
    (H100, torch.float32, True, True, True, "reference"),
    (A100, torch.bfloat16, True, False, True, "reference"),
    (DeviceInfo("cuda", (7, 0)), torch.float16, True, True, True, "reference"),
    (DeviceInfo("cpu"), torch.bfloat16, True, True, True, "reference"),
    (DeviceInfo("xla"), torch.bfloat16, True, True, True, "reference"),
    (DeviceInfo("rocm", None, arch="gfx942"), torch.bfloat16, True, True, True, "reference"),
])
def test_implementation_table(device, dtype, aligned, uniform, triton, impl):
    assert choose(device, dtype, aligned, uniform, triton) == impl


@pytest.mark.parametrize("device,dtype,aligned,impl", [
    (H100, torch.bfloat16, True, "grouped_mm"),
    (H100, torch.bfloat16, False, "reference"),
    (H100, torch.float16, True, "reference"),
    (A100, torch.bfloat16, True, "reference"),
    (DeviceInfo("cpu"), torch.bfloat16, True, "reference"),
])
def test_backward_table(device, dtype, aligned, impl):
    assert choose_backward(device, dtype, aligned) == impl


def test_moe_dispatch_is_a_default_only_where_a_fused_kernel_runs():
    assert fused_available([H100], {torch.bfloat16, torch.float32}) is None
    assert "no fused routed-experts kernel on cpu" in fused_available([DeviceInfo("cpu")], {torch.bfloat16})
    assert "take bf16/fp16" in fused_available([H100], {torch.float32})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grouped_mm_path_equals_the_loop(dtype, activation):
    """torch._grouped_mm runs on the CPU (torch 2.9 and 2.13): the sorted, grouped path is checked here."""
    T, d, f, E, k = 40, 16, 32, 5, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g).to(dtype)
    G, U = ([torch.randn(f, d, generator=g).to(dtype) for _ in range(E)] for _ in range(2))
    Dn = [torch.randn(d, f, generator=g).to(dtype) for _ in range(E)]
    assert grouped_experts.aligned(x, G)
    got = grouped_experts.forward(x, ids, w, G, U, Dn, activation)
    want = reference(x, ids, w, G, U, Dn, activation)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype is torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", True), ("relu", False), ("gelu", False)])
def test_grouped_mm_backward_equals_the_reference(dtype, activation, gated):
    """The CUDA backward path (sorted tokens, grouped GEMMs, token-dim groups for weight gradients) on the CPU."""
    T, d, f, E, k = 40, 16, 32, 5, 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g).to(dtype)
    G = [torch.randn(f, d, generator=g).to(dtype) for _ in range(E)] if gated else []
    U = [torch.randn(f, d, generator=g).to(dtype) for _ in range(E)]
    Dn = [torch.randn(d, f, generator=g).to(dtype) for _ in range(E)]
    grad = torch.randn(T, d, generator=g).to(dtype)
    got = grouped_experts.backward(grad, x, ids, w, G, U, Dn, activation)
    wide = lambda ts: [t.double() for t in ts]
    exact = reference_backward(grad.double(), x.double(), ids, w.double(), wide(G), wide(U), wide(Dn), activation)
    eager = reference_backward(grad, x, ids, w, G, U, Dn, activation)
    for name, a, b, c in zip(("x", "weights", "gate", "up", "down"), got, exact, eager):
        assert a.shape == b.shape and a.dtype == c.dtype, name
        if not b.numel():
            continue
        err, eager_err = ((t.double() - b).norm() / b.norm() for t in (a, c))  # relative L2
        assert err <= max(2 * eager_err, 1e-6), (name, err, eager_err)
    for stacked in got[2:]:
        if stacked.numel():
            assert torch.count_nonzero(stacked[-1]) == 0  # the idle expert


def test_grouped_mm_path_takes_a_stacked_parameter_as_it_is():
    T, d, f, E, k = 24, 16, 32, 4, 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, d, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    gate_up, down = torch.randn(E, 2 * f, d, generator=g), torch.randn(E, d, f, generator=g)
    stacked = ([gate_up[:, :f]], [gate_up[:, f:]], [down])
    listed = (list(gate_up[:, :f]), list(gate_up[:, f:]), list(down))
    torch.testing.assert_close(grouped_experts.forward(x, ids, w, *stacked, "silu"),
                               reference(x, ids, w, *listed, "silu"), rtol=1e-5, atol=1e-5)
    grad = torch.randn(T, d, generator=g)
    for a, b in zip(grouped_experts.backward(grad, x, ids, w, *stacked, "silu"),
                    reference_backward(grad, x, ids, w, *listed, "silu")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_grouped_mm_path_with_biases_equals_the_reference():
    T, d, f, E, k = 24, 16, 32, 4, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, d, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g)
    G, U = ([torch.randn(f, d, generator=g) for _ in range(E)] for _ in range(2))
    Dn = [torch.randn(d, f, generator=g) for _ in range(E)]
    biases = ([torch.randn(f, generator=g) for _ in range(E)], [torch.randn(f, generator=g) for _ in range(E)],
              [torch.randn(d, generator=g) for _ in range(E)])
    torch.testing.assert_close(grouped_experts.forward(x, ids, w, G, U, Dn, "silu", biases),
                               reference(x, ids, w, G, U, Dn, "silu", biases), rtol=1e-5, atol=1e-4)
    grad = torch.randn(T, d, generator=g)
    got = grouped_experts.backward(grad, x, ids, w, G, U, Dn, "silu", biases)
    want = reference_backward(grad, x, ids, w, G, U, Dn, "silu", biases)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert torch.count_nonzero(got[7][-1]) == 0  # the idle expert's down bias


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_the_cuda_kernels_return_fresh_tensors(monkeypatch, impl):
    """The CUDA kernels sit on the dispatcher's CUDA key without custom_op's per-call aliasing check, so
    their outputs must never alias an input or each other (here through the same functions on the CPU;
    ``triton`` runs under TRITON_INTERPRET=1)."""
    from kp_compiler.lowering import moe

    monkeypatch.setenv("KP_MOE_KERNEL", impl)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # with a GPU the kernels run on it (no interpreter)
    g = torch.Generator().manual_seed(3)
    T, d, f, E, k = 6, 16, 32, 3, 2
    x = torch.randn(T, d, generator=g).bfloat16().to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dev)
    w = torch.rand(T, k, generator=g).bfloat16().to(dev)
    mk = lambda r, c: [torch.randn(r, c, generator=g).bfloat16().to(dev) for _ in range(E)]
    G, U, D = mk(f, d), mk(f, d), mk(d, f)
    biases = (([torch.randn(f, generator=g).bfloat16().to(dev) for _ in range(E)],) * 2
              + ([torch.randn(d, generator=g).bfloat16().to(dev) for _ in range(E)],))
    inputs = [x, ids, w, *G, *U, *D, *biases[0], *biases[2]]
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    outs = [moe._cuda_forward(x, ids, w, G, U, D, "silu"),
            moe._cuda_forward_biased(x, ids, w, G, U, D, *biases, "silu"),
            *moe._cuda_backward(torch.randn(T, d, generator=g).bfloat16().to(dev), x, ids, w, G, U, D, *biases, "silu")]
    want = reference(x.float(), ids, w.float(), [t.float() for t in G], [t.float() for t in U], [t.float() for t in D], "silu")
    assert ((outs[0].float() - want).norm() / want.norm()).item() < 2e-2  # bf16 against the fp32 loop
    ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel()]
    assert not storages & set(ptrs) and len(set(ptrs)) == len(ptrs)


def test_gate_and_up_side_by_side_are_seen_as_one_weight_only_when_they_are():
    E, f, d = 3, 8, 16
    gate_up = torch.randn(E, 2 * f, d)
    both = grouped_experts.side_by_side([gate_up[:, :f]], [gate_up[:, f:]])
    assert both is not None and both.data_ptr() == gate_up.data_ptr() and torch.equal(both, gate_up)
    assert grouped_experts.side_by_side([gate_up[:, f:]], [gate_up[:, :f]]) is None  # up first: not [gate | up]
    assert grouped_experts.side_by_side([torch.randn(E, f, d)], [torch.randn(E, f, d)]) is None
    wide = torch.randn(E, 3 * f, d)  # gate and up with a gap between them
    assert grouped_experts.side_by_side([wide[:, :f]], [wide[:, 2 * f:]]) is None
    assert grouped_experts.side_by_side([], [gate_up[:, f:]]) is None
    assert grouped_experts.side_by_side(list(gate_up[:, :f]), list(gate_up[:, f:])) is None  # per-expert lists


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_side_by_side_forward_and_backward_with_biases_equal_the_reference(activation):
    """One GEMM over ``[gate | up]`` for the recompute and for dx, biases added to each half."""
    T, d, f, E, k = 30, 16, 32, 4, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, d, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g)
    gate_up, down = torch.randn(E, 2 * f, d, generator=g), torch.randn(E, d, f, generator=g)
    b_gu, b_down = torch.randn(E, 2 * f, generator=g), torch.randn(E, d, generator=g)
    roles = ([gate_up[:, :f]], [gate_up[:, f:]], [down])
    assert grouped_experts.side_by_side(*roles[:2]) is not None
    biases = (list(b_gu[:, :f]), list(b_gu[:, f:]), list(b_down))
    listed = (list(gate_up[:, :f]), list(gate_up[:, f:]), list(down))
    torch.testing.assert_close(grouped_experts.forward(x, ids, w, *roles, activation, biases),
                               reference(x, ids, w, *listed, activation, biases), rtol=1e-5, atol=1e-4)
    grad = torch.randn(T, d, generator=g)
    got = grouped_experts.backward(grad, x, ids, w, *roles, activation, biases)
    want = reference_backward(grad, x, ids, w, *listed, activation, biases)
    for name, a, b in zip(("x", "weights", "gate", "up", "down", "b_gate", "b_up", "b_down"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=name)
    assert torch.count_nonzero(got[2][-1]) == 0 and torch.count_nonzero(got[5][-1]) == 0  # the idle expert


def test_the_triton_backward_is_chosen_by_kp_moe_backward(monkeypatch):
    """``KP_MOE_BACKWARD=triton``: the Triton backward (no stacked weights) where it can run, fresh tensors equal
    to the reference, experts with biases too; another value picks another; an unknown value is an error."""
    from kp_compiler.lowering import moe
    from kp_compiler.ops import triton_expert_backward

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    T, d, f, E, k = 10, 16, 32, 3, 2
    x = torch.randn(T, d, generator=g).bfloat16().to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dev)
    w = torch.rand(T, k, generator=g).bfloat16().to(dev)
    mk = lambda r, c: [(torch.randn(r, c, generator=g) / c ** 0.5).bfloat16().to(dev) for _ in range(E)]  # noqa: E731
    G, U, D = mk(f, d), mk(f, d), mk(d, f)
    grad = torch.randn(T, d, generator=g).bfloat16().to(dev)
    calls = []
    real = triton_expert_backward.backward
    monkeypatch.setattr(triton_expert_backward, "backward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("KP_MOE_BACKWARD", "triton")
    got = moe._cuda_backward(grad, x, ids, w, G, U, D, [], [], [], "silu")
    assert calls == [1]
    want = reference_backward(grad.float(), x.float(), ids, w.float(), *([t.float() for t in ts] for ts in (G, U, D)),
                              "silu")
    for a, b in zip(got[:5], want):
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2
    inputs = {t.untyped_storage().data_ptr() for t in (x, ids, w, *G, *U, *D)}
    ptrs = [o.untyped_storage().data_ptr() for o in got if o.numel()]
    assert not inputs & set(ptrs) and len(set(ptrs)) == len(ptrs)
    bias = [torch.zeros(f, dtype=torch.bfloat16, device=dev)] * E
    moe._cuda_backward(grad, x, ids, w, G, U, D, bias, [], [], "silu")
    assert calls == [1, 1]  # with biases too
    monkeypatch.setenv("KP_MOE_BACKWARD", "grouped_mm")
    moe._cuda_backward(grad, x, ids, w, G, U, D, [], [], [], "silu")
    assert calls == [1, 1]
    monkeypatch.setenv("KP_MOE_BACKWARD", "fast")
    with pytest.raises(ValueError, match="KP_MOE_BACKWARD='fast'"):
        moe._cuda_backward(grad, x, ids, w, G, U, D, [], [], [], "silu")


def test_gate_and_up_with_different_row_strides_take_the_grouped_path():
    """``_gate_up`` reads gate and up with one row stride: where they differ, the Triton kernels are not used."""
    from kp_compiler.ops import triton_experts

    E, f, d = 3, 8, 16
    gate = [torch.randn(f, d).bfloat16() for _ in range(E)]
    up = [torch.randn(f, d + 8).bfloat16()[:, :d] for _ in range(E)]
    down = [torch.randn(d, f).bfloat16() for _ in range(E)]
    x = torch.randn(4, d).bfloat16()
    assert not triton_experts.supported(x, gate, up, down)
    assert triton_experts.supported(x, gate, [u.contiguous() for u in up], down)
