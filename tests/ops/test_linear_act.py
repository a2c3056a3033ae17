"""``kp::linear_act`` / ``kp::gated_linear`` and their ``_train`` variants (``ops/linear_act.py``): outputs and
gradients equal to the eager code they replace, in fp32 and bf16, on fresh random inputs; the registrations
(``opcheck``); compiled with dynamic shapes; bad input named."""

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.ops import linear_act
from kp_compiler.ops.activations import ACTIVATIONS

kp = torch.ops.kp  # linear_act's import registered its ops there
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def leaves(dtype, bias, gated, shape=(2, 5, 16), n=24):
    g = torch.Generator().manual_seed(hash((dtype, bias, gated, shape)) % 2**31)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    x = make(*shape)
    ws = [make(n, shape[-1]) for _ in range(2 if gated else 1)]
    bs = [make(n) if bias else None for _ in ws]
    return x, ws, bs


def eager(x, ws, bs, activation):
    act = ACTIVATIONS[activation]
    if len(ws) == 2:
        return act(F.linear(x, ws[0], bs[0])) * F.linear(x, ws[1], bs[1])
    return act(F.linear(x, ws[0], bs[0]))


def fused(x, ws, bs, activation, train):
    if len(ws) == 2:
        op = kp.gated_linear_train if train else kp.gated_linear
        out = op(x, ws[0], ws[1], bs[0], bs[1], activation)
    else:
        out = (kp.linear_act_train if train else kp.linear_act)(x, ws[0], bs[0], activation)
    return out[0] if train else out


def grads(out, tensors):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_equal_eager(dtype, activation, gated, bias, train):
    x, ws, bs = leaves(dtype, bias, gated)
    tensors = [x, *ws, *[b for b in bs if b is not None]]
    want = eager(x, ws, bs, activation)
    got = fused(x, ws, bs, activation, train)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for g, w in zip(grads(got, tensors), grads(want, tensors)):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_a_gradient_that_reaches_the_pre_activation_output_counts():
    """The ``_train`` variants return the pre-activations too; a user of them gets their gradient."""
    x, ws, bs = leaves(torch.float32, True, True)
    out, g, u = kp.gated_linear_train(x, ws[0], ws[1], bs[0], bs[1], "silu")
    got = torch.autograd.grad((out.sum() + (g * 3).sum() - u.sum()), [x, *ws, *bs])
    ref_g, ref_u = F.linear(x, ws[0], bs[0]), F.linear(x, ws[1], bs[1])
    want = torch.autograd.grad((F.silu(ref_g) * ref_u).sum() + (ref_g * 3).sum() - ref_u.sum(), [x, *ws, *bs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_the_wanted_gradients_are_computed():
    x, ws, bs = leaves(torch.float32, True, False)
    ws[0].requires_grad_(False)
    (dx, db) = torch.autograd.grad(linear_act.linear_act(x, ws[0], bs[0], "gelu").sum(), [x, bs[0]])
    want = torch.autograd.grad(F.gelu(F.linear(x, ws[0], bs[0])).sum(), [x, bs[0]])
    torch.testing.assert_close(dx, want[0])
    torch.testing.assert_close(db, want[1])


@pytest.mark.parametrize("op,args", [
    ("linear_act", lambda x, w, b: (x, w, b, "silu")),
    ("linear_act_train", lambda x, w, b: (x, w, b, "gelu_tanh")),
    ("gated_linear", lambda x, w, b: (x, w, w.detach().clone().requires_grad_(), b, None, "silu")),
    ("gated_linear_train", lambda x, w, b: (x, w, w.detach().clone().requires_grad_(), None, b, "gelu")),
])
def test_registrations_pass_opcheck(op, args):
    x, ws, bs = leaves(torch.float32, True, False)
    torch.library.opcheck(getattr(kp, op).default, args(x, ws[0], bs[0]))


def test_compiled_with_a_dynamic_batch_one_graph():
    from torch._dynamo.testing import CompileCounter

    def f(x, wg, wu):
        return kp.gated_linear(x, wg, wu, None, None, "silu")
    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, dynamic=True)
    wg, wu = torch.randn(24, 16), torch.randn(24, 16)
    for rows in (3, 7, 12):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x, wg, wu), F.silu(x @ wg.t()) * (x @ wu.t()))
    assert counter.frame_count == 1


def test_compiled_through_inductor_with_gradients():
    x, ws, bs = leaves(torch.float32, True, True)
    compiled = torch.compile(lambda x, wg, wu, bg, bu: kp.gated_linear_train(x, wg, wu, bg, bu, "gelu")[0],
                             backend="inductor")
    got = compiled(x, ws[0], ws[1], bs[0], bs[1])
    want = eager(x, ws, bs, "gelu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(got, [x, *ws, *bs]), grads(want, [x, *ws, *bs])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda x, w: kp.linear_act(x, w, None, "tanh"), "activation 'tanh' is not one of"),
    (lambda x, w: kp.linear_act(x, w.t().contiguous(), None, "relu"), "weights must be"),
    (lambda x, w: kp.linear_act(x, w.double(), None, "relu"), "a weight torch.float64"),
    (lambda x, w: kp.gated_linear(x, w, w[:3], None, None, "silu"), "all of one shape"),
    (lambda x, w: kp.linear_act(x, w, torch.zeros(5), "relu"), "a bias must be"),
])
def test_bad_input_is_named(call, message):
    x, w = torch.randn(4, 16), torch.randn(24, 16)
    with pytest.raises(ValueError, match=message):
        call(x, w)
