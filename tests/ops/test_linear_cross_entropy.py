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
    assert lce.chunk_rows(128256) == 1024  # 1024 x 128256 bf16 logits: 251 MiB
    assert lce.chunk_rows(256000) == 512 and lce.chunk_rows(32000) == 4096
    assert lce.chunk_rows(50) == 4096 and lce.chunk_rows(10**9) == 64


def test_the_fp32_accumulating_gemm_is_probed_and_refused_where_missing():
    """The CPU has no ``addmm`` with a 16-bit product into fp32: the probe says so and the two-step path runs."""
    lce._FP32_OUT.pop(torch.device("cpu"), None)
    assert lce._fp32_out(torch.device("cpu")) is False
    acc = torch.ones(3, 2)
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 2).bfloat16()
    assert lce._accumulate(acc, a, b, torch.float32) is acc
    torch.testing.assert_close(acc, 1 + (a @ b).float())


def test_rows_per_chunk_bounds_the_number_of_chunks():
    assert lce.rows_per_chunk(4096, 512) == 512  # 8 chunks
    assert lce.rows_per_chunk(16384, 512) == 2048  # raised to 8 chunks, a multiple of the table's rows
    assert lce.rows_per_chunk(5000, 512) == 1024  # 5 chunks
    assert lce.rows_per_chunk(13, 4) == 4 and lce.rows_per_chunk(13, 1) == 2 and lce.rows_per_chunk(0, 64) == 64
    for n in (1, 7, 100, 4097, 70000):
        assert -(-n // lce.rows_per_chunk(n, 64)) <= lce.MAX_CHUNKS


def _bf16_grad_w(monkeypatch, mode, n=512, v=96, d=32):
    monkeypatch.setenv("KP_LCE_ACCUMULATE", mode)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    (gw,) = torch.autograd.grad(OP(h, w, None, y, -100, 0.0, "mean", 0.0, n // 8)[0], [w])
    w64 = w.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(_eager(h.double(), w64, None, y, -100, 0.0, "mean", 0.0), [w64])
    (eager,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), y), [w])
    rel = lambda t: ((t.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    return gw, rel(gw), rel(eager)


def test_grad_w_accumulates_in_the_weights_dtype_by_default(monkeypatch):
    """8 chunks, so 8 roundings of the bf16 ``grad_w``: within 3x eager bf16's error (one rounding) in L2, and
    ``KP_LCE_ACCUMULATE=fp32`` (one rounding at the end) within 1.5x of it."""
    gw, err, eager_err = _bf16_grad_w(monkeypatch, "weight")
    assert gw.dtype == torch.bfloat16 and err <= 3 * eager_err
    gw32, err32, _ = _bf16_grad_w(monkeypatch, "fp32")
    assert err32 <= 1.5 * eager_err and not torch.equal(gw, gw32)


def test_an_unknown_accumulation_is_an_error(monkeypatch):
    monkeypatch.setenv("KP_LCE_ACCUMULATE", "bf16")
    with pytest.raises(ValueError, match="KP_LCE_ACCUMULATE"):
        OP(torch.randn(6, 4), torch.randn(9, 4), None, torch.zeros(6, dtype=torch.long), -100, 0.0, "mean", 0.0, 4)


def test_one_chunk_of_logits_is_held_at_a_time():
    """The H200 profile of the lce-128k step showed two chunks' logits live at its peak: the previous chunk's
    gradient (the same buffer, with the fused rows kernel) was still named when the next chunk's were made."""
    import weakref
    held = []

    def rows_in_place(z, labels, ignore_index, smoothing, softcap, scale, out=None):
        assert all(r() is None for r in held), "an earlier chunk's logits are still alive"
        loss, g = lce.rows(z, labels, ignore_index, smoothing, softcap, scale, out=out)
        z.copy_(g)  # the fused kernel's contract: the gradient written over the logits
        held.append(weakref.ref(z))
        return loss, z

    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (40,), generator=g)
    got = lce.forward(h, w, None, y, -100, 0.0, "mean", 0.0, 8, rows_fn=rows_in_place)
    want = lce.forward(h, w, None, y, -100, 0.0, "mean", 0.0, 8)
    assert len(held) == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_the_mean_scale_is_exact_in_float64():
    """3 valid labels: 1/3 taken in fp32 and widened would be 3e-8 off; fp64 logits get fp64's 1/3."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 3, -100, 6])
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), y)
    ref_h, ref_w = torch.autograd.grad(ref, [h, w])
    loss, gh, gw, _ = lce.forward(h.detach(), w.detach(), None, y, -100, 0.0, "mean", 0.0, 2)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(gh, ref_h, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gw, ref_w, rtol=1e-12, atol=1e-15)


def test_a_frozen_head_skips_the_weight_gradient(monkeypatch):
    """``weight_grads=False``: no ``grad_w`` GEMM (``_accumulate`` never called), empty ``grad_w``/``grad_b``, the
    loss and ``grad_h`` unchanged; asked for the weight's gradient anyway, the backward refuses."""
    g = torch.Generator().manual_seed(6)
    h, w, b = torch.randn(12, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    y = torch.randint(0, 30, (12,), generator=g)
    want = lce.forward(h, w, b, y, -100, 0.1, "mean", 0.0, 4)
    calls = []
    real = lce._accumulate
    monkeypatch.setattr(lce, "_accumulate", lambda *a: (calls.append(1), real(*a))[1])
    got = lce.forward(h, w, b, y, -100, 0.1, "mean", 0.0, 4, weight_grads=False)
    assert not calls and got[2].numel() == 0 and got[3].numel() == 0
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    wr = w.clone().requires_grad_()
    loss = OP(h.clone().requires_grad_(), wr, None, y, -100, 0.0, "mean", 0.0, 4, False)[0]
    with pytest.raises(RuntimeError, match="weight_grads=False"):
        loss.backward()
