"""The Triton backward of ``kp::routed_experts`` (``ops/triton_expert_backward.py``) against the reference
backward; on a machine without a GPU the kernels run in Triton's interpreter (tiny shapes)."""

import pytest
import torch

from kp_compiler.ops import triton_expert_backward, triton_experts
from kp_compiler.ops.routed_experts import reference_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "weights", "gate", "up", "down")


def make(T, d, f, E, k, dtype, gated=True, seed=0, stacked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)]).to(DEVICE)  # the last expert idle
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEVICE, dtype)
    grad = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    if stacked:  # transformers' layout: gate and up halves of one [E, 2f, d] parameter, down [E, d, f]
        gate_up = (torch.randn(E, 2 * f, d, generator=g) / d ** 0.5).to(DEVICE, dtype)
        down = (torch.randn(E, d, f, generator=g) / f ** 0.5).to(DEVICE, dtype)
        return grad, x, ids, w, [gate_up[:, :f]], [gate_up[:, f:]], [down]

    def experts(rows, cols):
        return [(torch.randn(rows, cols, generator=g) / cols ** 0.5).to(DEVICE, dtype) for _ in range(E)]
    return grad, x, ids, w, experts(f, d) if gated else [], experts(f, d), experts(d, f)


def run(args, activation):
    grad, x, ids, w, G, U, Dn = args
    return triton_expert_backward.backward(grad, x, ids, w, G, U, Dn, activation,
                                           triton_experts.expert_tables(x, G, U, Dn))


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", True), ("relu", False), ("gelu", False)])
def test_float32_equals_the_reference(activation, gated):
    args = make(12, 32, 48, 4, 2, torch.float32, gated)
    got, want = run(args, activation), reference_backward(*args, activation)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if b.numel():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    assert all(t.numel() == 0 for t in got[5:])  # no biases
    for stacked in got[2:5]:
        if stacked.numel():
            assert torch.count_nonzero(stacked[-1]) == 0  # the idle expert


def test_stacked_roles_read_in_place_and_block_padding():
    """3-D roles (gate and up as halves of one parameter) and T*k/E = 70 rows per expert: several blocks of 64."""
    args = make(140, 16, 32, 4, 2, torch.float32, stacked=True, seed=3)
    grad, x, ids, w, G, U, Dn = args
    listed = (list(G[0]), list(U[0]), list(Dn[0]))
    assert triton_experts.block_rows(140 * 2, 4) == 64
    got, want = run(args, "silu"), reference_backward(grad, x, ids, w, *listed, "silu")
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


# Triton's interpreter converts fp32 to bf16 by truncation (half of the values differ from torch's
# round-to-nearest, all toward zero, 0.28% on average; measured with torch 2.13, Triton 3.6), which biases
# every stored intermediate; the GPU rounds to nearest. So the bound is looser on the CPU.
BF16_FACTOR = 1.5 if DEVICE == "cuda" else 3.5


def test_bfloat16_is_as_close_as_the_eager_loop():
    args = make(24, 32, 64, 4, 2, torch.bfloat16, seed=1)
    grad, x, ids, w, G, U, Dn = args
    wide = [[t.double() for t in ts] for ts in (G, U, Dn)]
    exact = reference_backward(grad.double(), x.double(), ids, w.double(), *wide, "silu")
    got, eager = run(args, "silu"), reference_backward(*args, "silu")
    for name, a, b, c in zip(NAMES, got, exact, eager):
        assert a.dtype == c.dtype, name
        err, eager_err = ((t.double() - b).norm() / b.norm() for t in (a, c))
        assert err <= max(BF16_FACTOR * eager_err, 1e-3), (name, err.item(), eager_err.item())


@pytest.mark.parametrize("gated,roles", [(True, "gate-up-down"), (True, "down"), (False, "up-down")])
def test_biases_equal_the_reference(gated, roles):
    """Bias gradients per expert (sums over its rows), the biases added to the recomputed projections and the
    down bias's share of the routing weights' gradient; an idle expert's bias gradients are zeros."""
    args = make(30, 16, 32, 4, 2, torch.float32, gated, seed=7)
    grad, x, ids, w, G, U, Dn = args
    g = torch.Generator().manual_seed(8)

    def bias(rows, name):
        return [torch.randn(rows, generator=g).to(DEVICE) for _ in range(4)] if name in roles.split("-") else []
    biases = (bias(32, "gate") if gated else [], bias(32, "up"), bias(16, "down"))
    got = triton_expert_backward.backward(grad, x, ids, w, G, U, Dn, "gelu", triton_experts.expert_tables(x, G, U, Dn),
                                          biases)
    want = reference_backward(grad, x, ids, w, G, U, Dn, "gelu", biases)
    for name, a, b in zip(NAMES + ("b_gate", "b_up", "b_down"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    for b in got[5:]:
        if b.numel():
            assert torch.count_nonzero(b[-1]) == 0  # the idle expert
