"""``kp::linear_cross_entropy`` (``ops/linear_cross_entropy.py``): loss and gradients against eager in float64 for
every option, chunk boundaries, the fake implementation, input checks."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.ops import linear_cross_entropy as lce

OP = torch.ops.kp.linear_cross_entropy.default


def _eager(h, w, b, y, ignore_index, smoothing, reduction, softcap):
    z = F.linear(h, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("reduction, smoothing, softcap, bias, chunk",
                         list(itertools.product(["mean", "sum"], [0.0, 0.1], [0.0, 5.0], [False, True], [4])) +
                         [("mean", 0.0, 0.0, False, c) for c in (1, 13, 100)])
def test_equal_to_eager_in_float64(reduction, smoothing, softcap, bias, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 11, (13,), generator=g)
    y[[2, 5]] = -100
    leaves = [h, w] + ([b] if bias else [])
    ref = _eager(h, w, b, y, -100, smoothing, reduction, softcap)
    want = torch.autograd.grad(ref * 3.0, leaves)  # an incoming gradient other than 1
    got = OP(h, w, b, y, -100, smoothing, reduction, softcap, chunk)[0]
    torch.testing.assert_close(got, ref)
    for a, e in zip(torch.autograd.grad(got * 3.0, leaves), want):
        torch.testing.assert_close(a, e)


def test_only_the_inputs_that_need_a_gradient_get_one():
    h = torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = OP(h, w, None, torch.randint(0, 5, (6,)), -100, 0.0, "mean", 0.0, 4)[0]
    (gw,) = torch.autograd.grad(loss, [w])
    assert gw.shape == w.shape and h.grad is None


def test_bf16_within_eager_bf16s_error():
    g = torch.Generator().manual_seed(1)
    h64 = torch.randn(40, 32, dtype=torch.float64, generator=g)
    w64 = torch.randn(300, 32, dtype=torch.float64, generator=g) / 6
    y = torch.randint(0, 300, (40,), generator=g)
    exact = _eager(h64, w64, None, y, -100, 0.0, "mean", 0.0)
    h, w = h64.bfloat16().requires_grad_(), w64.bfloat16().requires_grad_()
    got = OP(h, w, None, y, -100, 0.0, "mean", 0.0, 16)[0]
    eager = F.cross_entropy(F.linear(h, w).float(), y)
    assert abs(got.double() - exact) <= 2 * abs(eager.double() - exact) + 1e-3
    gh, gw = torch.autograd.grad(got, [h, w])
    eh, ew = torch.autograd.grad(eager, [h, w])
    torch.testing.assert_close(gh.float(), eh.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), ew.float(), rtol=2e-2, atol=2e-3)


def test_fake_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        h, w, b = torch.empty(6, 4, dtype=torch.bfloat16), torch.empty(9, 4, dtype=torch.bfloat16), torch.empty(9, dtype=torch.bfloat16)
        loss, gh, gw, gb = OP(h, w, b, torch.zeros(6, dtype=torch.long), -100, 0.0, "sum", 0.0, 4)
    assert loss.shape == () and loss.dtype == torch.float32
    assert gh.shape == (6, 4) and gw.shape == (9, 4) and gb.shape == (9,) and gw.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="none"), "reduction"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must be int64"),
    (dict(labels=torch.zeros(6, dtype=torch.int32)), "labels must be int64"),
    (dict(b=torch.zeros(3)), "bias must be"),
    (dict(chunk=0), "chunk"),
    (dict(softcap=-1.0), "softcap"),
])
def test_bad_inputs_are_errors(kwargs, match):
    args = dict(h=torch.randn(6, 4), w=torch.randn(9, 4), b=None, labels=torch.zeros(6, dtype=torch.long),
                ignore_index=-100, label_smoothing=0.0, reduction="mean", softcap=0.0, chunk=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OP(*args.values())


def test_chunk_rows_from_the_vocabulary():
    assert lce.chunk_rows(128256) == 512  # 512 x 128256 fp32 logits: 251 MiB
    assert lce.chunk_rows(32000) == 2048
    assert lce.chunk_rows(50) == 4096 and lce.chunk_rows(10**9) == 64


def test_the_fp32_accumulating_gemm_is_probed_and_refused_where_missing():
    """The CPU has no ``addmm`` with a 16-bit product into fp32: the probe says so and the two-step path runs."""
    lce._FP32_OUT.pop(torch.device("cpu"), None)
    assert lce._fp32_out(torch.device("cpu")) is False
    acc = torch.ones(3, 2)
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 2).bfloat16()
    lce._accumulate(acc, a, b)
    torch.testing.assert_close(acc, 1 + (a @ b).float())
