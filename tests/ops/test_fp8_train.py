"""``kp::fp8_linear_train``: the training op that quantizes each tensor once and saves FP8 operands for its backward."""

import pytest
import torch

from kp_compiler.ops import fp8, fp8_cuda, fp8_quant, fp8_train
from kp_compiler.ops.fp8_quant import EMULATED
from tests.ops.test_fp8 import q

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def leaves(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(m, 5, 32, generator=g) * 3).requires_grad_(), (torch.randn(48, 32, generator=g) / 4).requires_grad_(),
            torch.randn(48, generator=g).requires_grad_(), torch.randn(m, 5, 48, generator=g))


@pytest.mark.parametrize("m", [128, 16, 3])  # 640 tokens (whole tiles of the paired cast); 80; 15 (padded to 16)
def test_equals_the_tensorwise_op_bit_for_bit_forward_and_backward(m):
    x, w, b, grad = leaves(m)
    out, qxt, qwt, sx, sw = torch.ops.kp.fp8_linear_train(x, w, b, E4M3, E5M2)
    assert qxt.dtype == qwt.dtype == E4M3 and qxt.shape == (32, fp8_quant.padded(5 * m)) and qwt.shape == (32, 48)
    assert not (qxt.requires_grad or qwt.requires_grad or sx.requires_grad)
    assert qxt[:, 5 * m:].float().abs().sum() == 0  # the padding is zeros
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = torch.ops.kp.fp8_linear(*ref_leaves, "tensorwise", E4M3, E5M2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(out, [x, w, b], grad), torch.autograd.grad(ref, ref_leaves, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and both against the quantization written out
    x2, g2 = x.detach().reshape(-1, 32), grad.reshape(-1, 48)
    gx, gw, _ = torch.autograd.grad(torch.ops.kp.fp8_linear_train(x, w, b, E4M3, E5M2)[0], [x, w, b], grad)
    torch.testing.assert_close(gx.reshape(-1, 32), q(g2, E5M2, False) @ q(w.detach().t(), E4M3, False).t(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gw, q(g2.t(), E5M2, False) @ q(x2.t(), E4M3, False).t(), rtol=1e-6, atol=1e-5)


def test_the_backward_keeps_fp8_operands_not_the_inputs():
    x, w, b, grad = leaves(16, seed=1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.ops.kp.fp8_linear_train(x, w, b, E4M3, E5M2)[0]
    assert [t.dtype for t in saved] == [E4M3, E4M3, torch.float32, torch.float32]
    assert [tuple(t.shape) for t in saved] == [(32, 80), (32, 48), (), ()]
    out.backward(grad)
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_opcheck_and_an_unused_output():
    x, w, b, _ = leaves(3, seed=2)
    torch.library.opcheck(torch.ops.kp.fp8_linear_train.default, (x, w, b, E4M3, E5M2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="FP8 dtype"):
        torch.ops.kp.fp8_linear_train(x, w, b, torch.bfloat16, E5M2)
    out = torch.ops.kp.fp8_linear_train(x, w, b, E4M3, E5M2)
    (out[0].sum() * 0 + x.sum()).backward()  # a zero gradient flows through, finite
    assert torch.isfinite(w.grad).all() and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.skipif(not fp8_cuda.cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("m", [128, 16, 3])
def test_the_cuda_kernel_path_equals_the_emulation(m):
    """``fp8_cuda.KERNELS`` (``torch._scaled_mm``, compiled casts) on the CPU: the same FP8 bytes, GEMMs to fp32 rounding."""
    x, w, b, grad = (t.detach() for t in leaves(m, seed=3))
    got, want = fp8_train.forward(fp8_cuda.KERNELS, x, w, b, E4M3), fp8_train.forward(EMULATED, x, w, b, E4M3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # torch._scaled_mm: see tests/ops/test_fp8_cuda.py
    for a, c in zip(got[1:], want[1:]):  # the FP8 operands and scales: exact
        assert a.shape == c.shape and torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a,
                                                  c.view(torch.uint8) if c.dtype == E4M3 else c)
    for a, c in zip(fp8_train.backward(fp8_cuda.KERNELS, grad, *got[1:], E5M2, w.dtype),
                    fp8.backward(EMULATED, grad, x, w, "tensorwise", E4M3, E5M2)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # torch._scaled_mm: see tests/ops/test_fp8_cuda.py
