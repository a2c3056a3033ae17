"""``kp::routed_experts_train``: the forward keeps the gate/up pre-activations its backward reads instead of
recomputing them (``grouped_experts.forward(save=True)`` / ``backward(saved=...)``, on the CPU here)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kp_compiler.ops import grouped_experts, routed_experts_train
from kp_compiler.ops.routed_experts import reference, reference_backward

T, d, f, E, k = 24, 16, 32, 4, 2


def _inputs(layout: str, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g).to(dtype)
    rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    if layout == "lists":
        roles = [rnd(f, d) for _ in range(E)], [rnd(f, d) for _ in range(E)], [rnd(d, f) for _ in range(E)]
    elif layout == "side_by_side":  # transformers' gate_up_proj [E, 2f, d]
        gu = rnd(E, 2 * f, d)
        roles = [gu[:, :f]], [gu[:, f:]], [rnd(E, d, f)]
    elif layout == "separate_3d":
        roles = [rnd(E, f, d)], [rnd(E, f, d)], [rnd(E, d, f)]
    else:  # ungated lists
        roles = [], [rnd(f, d) for _ in range(E)], [rnd(d, f) for _ in range(E)]
    return x, ids, w, roles


def _listed(roles):
    return tuple(list(r[0].unbind(0)) if len(r) == 1 and r[0].dim() == 3 else list(r) for r in roles)


LAYOUTS = ["lists", "side_by_side", "separate_3d", "ungated"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_pre_activations_are_the_sorted_gate_and_up(layout):
    x, ids, w, roles = _inputs(layout)
    act = "silu" if roles[0] else "gelu"
    out, saved = grouped_experts.forward(x, ids, w, *roles, act, save=True)
    torch.testing.assert_close(out, grouped_experts.forward(x, ids, w, *roles, act), rtol=0, atol=0)
    torch.testing.assert_close(out, reference(x, ids, w, *_listed(roles), act), rtol=1e-5, atol=1e-5)
    order = torch.argsort(ids.flatten(), stable=True)
    tokens, expert = order // k, ids.flatten()[order]
    gate, up, _ = _listed(roles)
    want = torch.stack([torch.cat([gate[e] @ x[t], up[e] @ x[t]]) if gate else up[e] @ x[t]
                        for t, e in zip(tokens.tolist(), expert.tolist())])
    assert saved.shape == (T * k, 2 * f if gate else f)
    torch.testing.assert_close(saved, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_from_saved_equals_the_recomputing_backward(layout, dtype):
    x, ids, w, roles = _inputs(layout, seed=1, dtype=dtype)
    act = "gelu_tanh" if roles[0] else "relu"
    _, saved = grouped_experts.forward(x, ids, w, *roles, act, save=True)
    grad = torch.randn(T, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = grouped_experts.backward(grad, x, ids, w, *roles, act, saved=saved)
    recomputed = grouped_experts.backward(grad, x, ids, w, *roles, act)
    for a, b in zip(got, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same values, read instead of recomputed
    changed = grouped_experts.backward(grad, x, ids, w, *roles, act, saved=saved * 2)
    assert not torch.equal(changed[1], got[1])  # read, not recomputed (the routing weights' gradient)
    wide = [[t.double() for t in r] for r in _listed(roles)]
    exact = reference_backward(grad.double(), x.double(), ids, w.double(), *wide, act)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), got, exact):
        if b.numel():
            err = (a.double() - b).norm() / b.norm()
            assert err < (2e-2 if dtype is torch.bfloat16 else 1e-5), (name, err)


def test_save_refuses_biases():
    x, ids, w, roles = _inputs("lists")
    biases = ([torch.zeros(f)] * E, [torch.zeros(f)] * E, [torch.zeros(d)] * E)
    with pytest.raises(ValueError, match="without biases"):
        grouped_experts.forward(x, ids, w, *roles, "silu", biases, save=True)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("layout", ["lists", "side_by_side"])
def test_op_gradients_equal_eager_autograd(layout, keep, monkeypatch):
    """The op under autograd, with the forward keeping the pre-activations (as on an H100) or not (the CPU):
    output and every gradient equal the loop's autograd; the fake's shapes equal the real outputs'."""
    monkeypatch.setattr(routed_experts_train, "saves", lambda x, w_up: keep)
    x, ids, w, roles = _inputs(layout, seed=2)
    leaves = [x, w, *(t for r in roles for t in r)]
    mine = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().requires_grad_() for t in leaves]

    def split(ts):
        xx, ww, *rest = ts
        n = [len(r) for r in roles]
        return xx, ww, (rest[:n[0]], rest[n[0]:n[0] + n[1]], rest[n[0] + n[1]:])

    xx, ww, rr = split(mine)
    out, saved = torch.ops.kp.routed_experts_train(xx, ids, ww, *rr, "silu")
    assert saved.shape == ((T * k, 2 * f) if keep else (0,))
    grad = torch.randn(T, d)
    out.backward(grad)
    xe, we, re_ = split(theirs)
    want = reference(xe, ids, we, *_listed(re_), "silu")
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(mine, theirs):
        assert (a.grad is None) == (b.grad is None)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, ids, w)]
        froles = [[mode.from_tensor(t) for t in r] for r in roles]
        fout, fsaved = torch.ops.kp.routed_experts_train(*fakes, *froles, "silu")
    assert fout.shape == out.shape and fsaved.shape == saved.shape


def test_more_experts_keep_them_through_the_triton_epilogue_when_asked(monkeypatch):
    """``$KP_MOE_SAVE_TRITON=1`` past ``SAVE_MAX_EXPERTS``: the CUDA forward (run here under Triton's interpreter)
    returns the Triton kernels' output and the pre-activations in the grouped path's order, and the backward
    from them equals the reference's."""
    from kp_compiler.lowering import moe
    from kp_compiler.ops import triton_experts

    monkeypatch.setenv(routed_experts_train.TRITON_SAVE_ENV, "1")
    monkeypatch.setattr(routed_experts_train, "saves", lambda x, w_up: True)  # as on an H100 in bf16
    calls = []
    real_forward = triton_experts.forward
    monkeypatch.setattr(triton_experts, "forward", lambda *a, **kw: calls.append(kw) or real_forward(*a, **kw))
    n = routed_experts_train.SAVE_MAX_EXPERTS + 4
    g = torch.Generator().manual_seed(9)
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731  (the Triton kernels take bf16/fp16)
    x = bf16(torch.randn(6, d, generator=g))
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(6)])
    w = bf16(torch.rand(6, k, generator=g))
    G, U = ([bf16(torch.randn(f, d, generator=g) / d ** 0.5) for _ in range(n)] for _ in range(2))
    Dn = [bf16(torch.randn(d, f, generator=g) / f ** 0.5) for _ in range(n)]
    out, saved = moe._cuda_forward_train(x, ids, w, G, U, Dn, "silu")
    assert [c.get("save") for c in calls] == [True]  # the Triton kernels wrote them
    want_out, want_saved = grouped_experts.forward(x, ids, w, G, U, Dn, "silu", save=True)
    assert saved.shape == want_saved.shape == (6 * k, 2 * f)
    torch.testing.assert_close(out, want_out, rtol=2e-2, atol=2e-2)
    # within one bf16 ulp of the grouped path's: Triton's interpreter truncates fp32 -> bf16 where the GPU
    # rounds to nearest, which also doubles the saved values' error (and the gradients' below) on the CPU
    assert ((saved.float() - want_saved.float()).abs() <= want_saved.float().abs() * 2 ** -7 + 1e-6).all()
    grad = bf16(torch.randn(6, d, generator=g))
    got = routed_experts_train.backward_impl(grad, x, ids, w, saved, G, U, Dn, "silu")
    wide = lambda ts: [t.double() for t in ts]  # noqa: E731
    exact = reference_backward(grad.double(), x.double(), ids, w.double(), wide(G), wide(U), wide(Dn), "silu")
    eager = reference_backward(grad, x, ids, w, G, U, Dn, "silu")
    for name, a, b, c in zip(("x", "weights", "gate", "up", "down"), got, exact, eager):
        err, eager_err = ((t.double() - b).norm() / b.norm() for t in (a, c))
        assert err <= 3 * eager_err, (name, err, eager_err)
