"""``kp::routed_experts``: the reference equals the expert loop; the written-out backward equals autograd."""

import pytest
import torch

import kp_compiler.ops  # noqa: F401
from kp_compiler.ops.routed_experts import ACTIVATIONS, reference

T, D, F_, E, K = 12, 8, 12, 4, 2


def inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, dtype=dtype, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, dtype=dtype, generator=g, requires_grad=True)

    def mk(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g, requires_grad=True)
    return x, ids, w, [mk(F_, D) for _ in range(E)], [mk(F_, D) for _ in range(E)], [mk(D, F_) for _ in range(E)]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_and_gradients_equal_the_loop(activation):
    x, ids, w, G, U, Dn = inputs()
    out = torch.ops.kp.routed_experts(x, ids, w, G, U, Dn, activation)
    ref = reference(x, ids, w, G, U, Dn, activation)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    leaves = [x, w, *G, *U, *Dn]
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_an_expert_with_no_tokens_gets_zero_gradients():
    x, ids, w, G, U, Dn = inputs()
    ids = ids % (E - 1)  # expert E-1 receives nothing
    out = torch.ops.kp.routed_experts(x, ids, w, G, U, Dn, "silu")
    grads = torch.autograd.grad(out.sum(), [G[-1], U[-1], Dn[-1]])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_opcheck():
    torch.library.opcheck(torch.ops.kp.routed_experts.default, inputs(torch.float32) + ("silu",))


def test_bad_arguments_are_clear_errors():
    x, ids, w, G, U, Dn = inputs()
    with pytest.raises(ValueError, match="activation 'tanh'"):
        torch.ops.kp.routed_experts(x, ids, w, G, U, Dn, "tanh")
    with pytest.raises(ValueError, match="one weight per expert"):
        torch.ops.kp.routed_experts(x, ids, w, G, U[:-1], Dn, "silu")


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_ungated_experts_forward_and_gradients(activation):
    x, ids, w, _, U, Dn = inputs()
    out = torch.ops.kp.routed_experts(x, ids, w, [], U, Dn, activation)
    ref = reference(x, ids, w, [], U, Dn, activation)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    leaves = [x, w, *U, *Dn]
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stacked_3d_weights_equal_per_expert_lists_and_get_stacked_gradients():
    """Each role as one [E, rows, cols] tensor (here the gate and up halves of one gate_up parameter)."""
    x, ids, w, G, U, Dn = inputs()
    gate_up = torch.cat([torch.stack(G), torch.stack(U)], dim=1).detach().requires_grad_()  # [E, 2F, D]
    down = torch.stack(Dn).detach().requires_grad_()
    gate, up = gate_up[:, :F_], gate_up[:, F_:]
    out = torch.ops.kp.routed_experts(x, ids, w, [gate], [up], [down], "silu")
    ref = reference(x, ids, w, G, U, Dn, "silu")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, gate_up, down], grad)
    want = torch.autograd.grad(ref, [x, w, *G, *U, *Dn], grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2], torch.cat([torch.stack(want[2:2 + E]), torch.stack(want[2 + E:2 + 2 * E])], 1))
    torch.testing.assert_close(got[3], torch.stack(want[2 + 2 * E:]))


def test_opcheck_stacked():
    x, ids, w, G, U, Dn = inputs(torch.float32)
    torch.library.opcheck(torch.ops.kp.routed_experts.default,
                          (x, ids, w, [torch.stack(G)], [torch.stack(U)], [torch.stack(Dn)], "gelu"))


def test_mixed_stacked_and_listed_roles_are_an_error():
    x, ids, w, G, U, Dn = inputs()
    with pytest.raises(ValueError, match="one 3-D tensor"):
        torch.ops.kp.routed_experts(x, ids, w, G, [torch.stack(U)], Dn, "silu")


def test_biased_op_forward_and_gradients_equal_the_loop():
    x, ids, w, G, U, Dn = inputs()
    g = torch.Generator().manual_seed(3)
    bG, bU = ([torch.randn(F_, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(E)]
              for _ in range(2))
    bD = [torch.randn(D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(E)]
    out = torch.ops.kp.routed_experts_biased(x, ids, w, G, U, Dn, bG, bU, bD, "gelu_tanh")
    ref = reference(x, ids, w, G, U, Dn, "gelu_tanh", (bG, bU, bD))
    loop = torch.zeros_like(x)  # the loop written out with F.linear's bias, independent of `reference`
    for e in range(E):
        tok, slot = torch.where(ids == e)
        h = torch.nn.functional.gelu(torch.nn.functional.linear(x[tok], G[e], bG[e]), approximate="tanh")
        h = h * torch.nn.functional.linear(x[tok], U[e], bU[e])
        loop = loop.index_add(0, tok, torch.nn.functional.linear(h, Dn[e], bD[e]) * w[tok, slot, None])
    torch.testing.assert_close(out, loop, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref, loop, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    leaves = [x, w, *G, *U, *Dn, *bG, *bU, *bD]
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(loop, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_opcheck_biased():
    x, ids, w, G, U, Dn = inputs(torch.float32)
    bU, bD = [torch.randn(F_) for _ in range(E)], [torch.randn(D) for _ in range(E)]
    torch.library.opcheck(torch.ops.kp.routed_experts_biased.default, (x, ids, w, [], U, Dn, [], bU, bD, "relu"))


def test_a_bias_of_the_wrong_size_is_a_clear_error():
    x, ids, w, G, U, Dn = inputs()
    with pytest.raises(ValueError, match="b_down needs one"):
        torch.ops.kp.routed_experts_biased(x, ids, w, G, U, Dn, [], [], [torch.zeros(D + 1)] * E, "silu")
