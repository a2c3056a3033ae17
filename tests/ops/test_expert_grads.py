"""The backward's elementwise pass (``ops/expert_grads.py``): the Triton kernel (Triton's interpreter on a
machine without a GPU) and the ATen reference against autograd through ``act(g) * u``."""

import pytest
import torch

from kp_compiler.ops import expert_grads
from kp_compiler.ops.routed_experts import ACTIVATIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def autograd_grads(g, u, g_dh, route, activation):
    """What the kernel must produce, by autograd in float64: ``dg, du, hr, dr``."""
    act = ACTIVATIONS[activation]
    g = None if g is None else g.double().requires_grad_()
    u = u.double().requires_grad_()
    r = route.double().requires_grad_()
    h = act(g) * u if g is not None else act(u)
    y = h * r[:, None]  # the routing weight scales the down projection's input here
    y.backward(g_dh.double())
    return (None if g is None else g.grad), u.grad, (h * r[:, None]).detach(), r.grad


def inputs(rows, f, dtype, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s: (2 * torch.randn(*s, generator=gen)).to(DEVICE, dtype)  # noqa: E731
    return (t(rows, f) if gated else None), t(rows, f), t(rows, f), torch.rand(rows, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("impl", [expert_grads.grads, expert_grads.reference])
def test_equals_autograd_in_float32(impl, activation, gated):
    g, u, g_dh, route = inputs(37, 200, torch.float32, gated)  # rows and f not multiples of the tiles
    dg = torch.full_like(u, float("nan")) if gated else None
    du, hr = torch.full_like(u, float("nan")), torch.full_like(u, float("nan"))
    dr = impl(g, u, g_dh, route, activation, dg, du, hr)
    want = autograd_grads(g, u, g_dh, route, activation)
    for name, got, exp in zip(("dg", "du", "hr", "dr"), (dg, du, hr, dr), want):
        if exp is None:
            continue
        assert got.dtype is torch.float32, name
        torch.testing.assert_close(got.double().cpu(), exp.cpu(), rtol=1e-4, atol=1e-4, msg=name)


def test_writes_into_slices_of_one_buffer_in_bfloat16():
    """``[dg | du]`` side by side, as the backward lays them out for one GEMM against ``gate_up``."""
    g, u, g_dh, route = inputs(40, 64, torch.bfloat16, True, seed=1)
    both = torch.zeros(40, 128, device=DEVICE, dtype=torch.bfloat16)
    hr = torch.empty_like(u)
    dr = expert_grads.grads(g, u, g_dh, route, "silu", both[:, :64], both[:, 64:], hr)
    want = autograd_grads(g, u, g_dh, route, "silu")
    for got, exp in zip((both[:, :64], both[:, 64:], hr, dr), want):
        torch.testing.assert_close(got.double().cpu(), exp.cpu(), rtol=2e-2, atol=2e-2)
    assert dr.dtype is torch.float32


def test_the_triton_kernel_runs_here():
    """On the CPU the tests run the kernel in Triton's interpreter (``tests/conftest.py``), not the reference."""
    import os
    assert expert_grads._HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def test_a_column_strided_operand_is_a_clear_error():
    g, u, g_dh, route = inputs(8, 16, torch.float32, True)
    with pytest.raises(ValueError, match="unit stride"):
        expert_grads.grads(g.t().contiguous().t(), u, g_dh, route, "silu", torch.empty_like(u), torch.empty_like(u),
                           torch.empty_like(u))
