"""``kp::fp8_gated_mlp_train``: the fused gated MLP against the separate FP8 ops it replaces, and against eager."""

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.ops import fp8_cuda, fp8_gated, fp8_gated_quant
from kp_compiler.ops.fp8_quant import EMULATED

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def leaves(seed=0, dtype=torch.float32, tokens=(3, 10)):
    """x [*tokens, 32], w_gate and w_up [48, 32], w_down [16, 48]: 30 tokens, not a multiple of 16 (padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, 32, generator=g) * 2
    ws = [torch.randn(48, 32, generator=g) / 4, torch.randn(48, 32, generator=g) / 4,
          torch.randn(16, 48, generator=g) / 6]
    return [t.to(dtype).requires_grad_() for t in (x, *ws)]


def fused(x, wg, wu, wd, act):
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    return torch.ops.kp.fp8_gated_mlp_train(x, qx, qxt, sx, wg, wu, wd, act, E4M3, E5M2, False)[0]


def separate(x, wg, wu, wd, act):
    """What the fp8-linear step emits without the fusion: two shared-cast linears, the activation, a training op."""
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    g = torch.ops.kp.fp8_linear_shared(x, qx, qxt, sx, wg, None, E4M3, E5M2, False)[0]
    u = torch.ops.kp.fp8_linear_shared(x, qx, qxt, sx, wu, None, E4M3, E5M2, False)[0]
    return torch.ops.kp.fp8_linear_train(ACTS[act](g) * u, wd, None, E4M3, E5M2)[0]


def grads(fn, ts, act, seed=5):
    out = fn(*ts, act)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return out, torch.autograd.grad(out, ts, dout)


@pytest.mark.parametrize("act", list(ACTS))
def test_fp32_equals_the_separate_ops_bit_for_bit(act):
    """In fp32 nothing is rounded to 16 bits in between, so fusing changes no value, forward or backward."""
    a, b = leaves(1), leaves(1)
    out, got = grads(fused, a, act)
    ref, want = grads(separate, b, act)
    assert torch.equal(out, ref)
    for name, x, y in zip(("x", "w_gate", "w_up", "w_down"), got, want):
        assert x is not None and y is not None, name
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        assert x.abs().max() > 0, name


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("act", list(ACTS))
def test_bf16_matches_eager_within_fp8_error(act):
    """bf16: one rounding (FP8) where the separate ops round twice (bf16, then FP8); both against eager bf16."""
    a, b, e = leaves(2, torch.bfloat16), leaves(2, torch.bfloat16), leaves(2, torch.bfloat16)
    out, got = grads(fused, a, act)
    ref, want = grads(separate, b, act)

    def eager(x, wg, wu, wd, act):
        return F.linear(ACTS[act](F.linear(x, wg)) * F.linear(x, wu), wd)

    eag, exact = grads(eager, e, act)
    assert out.dtype == torch.bfloat16 and rel(out, eag) < 0.08
    assert abs(rel(out, eag) - rel(ref, eag)) < 0.02  # as close to eager as the separate ops are
    for name, x, y, z in zip(("x", "w_gate", "w_up", "w_down"), got, want, exact):
        assert x.dtype == torch.bfloat16, name
        assert rel(x, z) < 0.15, name  # E5M2 gradients: 2 mantissa bits
        assert abs(rel(x, z) - rel(y, z)) < 0.05, name


def test_no_gradient_for_an_unused_output_and_nothing_for_the_cast():
    x, wg, wu, wd = leaves(3)
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    outs = torch.ops.kp.fp8_gated_mlp_train(x, qx, qxt, sx, wg, wu, wd, "silu", E4M3, E5M2, False)
    assert outs[0].requires_grad and not any(t.requires_grad for t in outs[1:])
    (outs[0] * 0).sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() == 0 for t in (x, wg, wu, wd))


def test_opcheck_and_bad_input():
    x, wg, wu, wd = leaves(4)
    qx, qxt, sx = torch.ops.kp.fp8_cast_pair(x, E4M3)
    args = (x, qx, qxt, sx, wg, wu, wd, "silu", E4M3, E5M2, False)
    torch.library.opcheck(torch.ops.kp.fp8_gated_mlp_train.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.kp.fp8_gated_mlp_train(x, qx, qxt, sx, wg, wu, wd, "relu", E4M3, E5M2, False)
    with pytest.raises(ValueError, match="w_gate and w_up"):
        torch.ops.kp.fp8_gated_mlp_train(x, qx, qxt, sx, wg, wu[:32], wd, "silu", E4M3, E5M2, False)
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.kp.fp8_gated_mlp_train(x, qx, qxt, sx, wg, wu, wd.double(), "silu", E4M3, E5M2, False)


@pytest.mark.skipif(not fp8_cuda.cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_the_cuda_kernel_path_equals_the_emulation(act, monkeypatch):
    """The CUDA body (torch._scaled_mm, the casts' eager functions on the CPU) against the emulation's body."""
    monkeypatch.setenv("KP_FP8_CASTS", "eager")
    x, wg, wu, wd = (t.detach() for t in leaves(6))
    qx, qxt, sx = fp8_gated_quant.quantize_pair(x.reshape(-1, 32), E4M3)
    args = (x, qx, sx, wg, wu, wd, act, E4M3)
    got = fp8_gated.forward(fp8_cuda.KERNELS, fp8_cuda.GATED, *args)
    want = fp8_gated.forward(EMULATED, fp8_gated.EMULATED_GATED, *args)
    for a, b in zip(got, want):
        a, b = (t.view(torch.uint8) if t.dtype == E4M3 else t for t in (a, b))
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    dout = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(7))
    saved = (got[1], got[2], qxt, sx, *got[3:])
    bk = fp8_gated.backward(fp8_cuda.KERNELS, fp8_cuda.GATED, dout, *saved, act, E5M2, torch.float32)
    be = fp8_gated.backward(EMULATED, fp8_gated.EMULATED_GATED, dout, *saved, act, E5M2, torch.float32)
    for a, b in zip(bk, be):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
