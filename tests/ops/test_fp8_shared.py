"""``kp::fp8_cast_pair`` + ``kp::fp8_linear_shared``: one cast of a shared input, the same bytes as per-linear ops."""

import pytest
import torch

from kp_compiler.ops import fp8_cuda, fp8_train
from kp_compiler.ops.fp8_quant import EMULATED

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(3, 16, 32, generator=g) * 3).requires_grad_(), torch.randn(64, 32, generator=g).requires_grad_(),
            torch.randn(48, 32, generator=g).requires_grad_(), torch.randn(64, generator=g).requires_grad_())


def test_two_consumers_of_one_cast_equal_two_training_ops_bit_for_bit():
    x, w1, w2, b = leaves()
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    assert not (qx.requires_grad or qxt.requires_grad or sx.requires_grad)
    o1 = torch.ops.kp.fp8_linear_shared(x, qx, qxt, sx, w1, b, E4M3, E5M2, False)[0]
    o2 = torch.ops.kp.fp8_linear_shared(x, qx, qxt, sx, w2, None, E4M3, E5M2, False)[0]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, b)]
    rx, rw1, rw2, rb = ref_leaves
    r1 = torch.ops.kp.fp8_linear_train(rx, rw1, rb, E4M3, E5M2)[0]
    r2 = torch.ops.kp.fp8_linear_train(rx, rw2, None, E4M3, E5M2)[0]
    assert torch.equal(o1, r1) and torch.equal(o2, r2)
    got = torch.autograd.grad(o1.square().sum() + o2.sin().sum(), [x, w1, w2, b])
    want = torch.autograd.grad(r1.square().sum() + r2.sin().sum(), ref_leaves)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_opcheck_and_bad_dtype():
    x, w1, _, b = leaves(1)
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    torch.library.opcheck(torch.ops.kp.fp8_linear_shared.default, (x, qx, qxt, sx, w1, b, E4M3, E5M2, False),
                          test_utils=("test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.kp.fp8_cast_pair.default, (x, E4M3), test_utils=("test_faketensor",))
    with pytest.raises(ValueError, match="FP8 dtype"):
        torch.ops.kp.fp8_cast_pair(x, torch.bfloat16)


@pytest.mark.skipif(not fp8_cuda.cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
def test_the_cuda_kernel_path_equals_the_emulation():
    x, w1, _, b = (t.detach() for t in leaves(2))
    cast_k, cast_e = fp8_train.cast(fp8_cuda.KERNELS, x, E4M3), fp8_train.cast(EMULATED, x, E4M3)
    for a, c in zip(cast_k, cast_e):
        assert torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a, c.view(torch.uint8) if c.dtype == E4M3 else c)
    got = fp8_train.linear(fp8_cuda.KERNELS, x, cast_k[0], cast_k[2], w1, b, E4M3)
    want = fp8_train.forward(EMULATED, x, w1, b, E4M3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # torch._scaled_mm: see tests/ops/test_fp8_cuda.py
    assert torch.equal(got[1].view(torch.uint8), want[2].view(torch.uint8)) and torch.equal(got[2], want[4])
