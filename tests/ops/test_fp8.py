"""``kp::fp8_linear``: each recipe against a reference that quantizes the same way, forward and backward."""

import pytest
import torch

import kp_compiler.ops  # noqa: F401
from kp_compiler.ops.fp8 import fp8_max

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def q(t, dtype, rowwise):
    """Reference: quantize-dequantize with per-tensor or per-row amax scaling, written out directly."""
    amax = t.abs().amax(-1, keepdim=True) if rowwise else t.abs().amax()
    s = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    return (t / s).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).float() * s


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_forward_and_backward_equal_the_same_quantization_written_out(recipe):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 32, generator=g) * 3).requires_grad_()
    w = (torch.randn(48, 32, generator=g) / 4).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    rw = recipe == "rowwise"
    out = torch.ops.kp.fp8_linear(x, w, b, recipe, E4M3, E5M2)
    want = q(x.detach().reshape(-1, 32), E4M3, rw) @ q(w.detach(), E4M3, rw).t() + b.detach()
    torch.testing.assert_close(out.reshape(-1, 48), want, rtol=1e-6, atol=1e-5)
    grad = torch.randn(3, 5, 48, generator=g)
    gx, gw, gb = torch.autograd.grad(out, [x, w, b], grad)
    g2, x2 = grad.reshape(-1, 48), x.detach().reshape(-1, 32)
    want_gx = q(g2, E5M2, rw) @ q(w.detach().t(), E4M3, rw).t()
    want_gw = q(g2.t(), E5M2, rw) @ q(x2.t(), E4M3, rw).t()
    torch.testing.assert_close(gx.reshape(-1, 32), want_gx, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gw, want_gw, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gb, g2.sum(0))
    exact = x.detach() @ w.detach().t() + b.detach()  # and FP8 is close to, but not, the exact product
    err = ((out - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.1


def test_rowwise_tracks_rows_of_very_different_scale_better_than_tensorwise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 2, 8)[:, None]  # rows from 1e-4 to 1e2
    w = torch.randn(32, 64, generator=g)
    exact = x @ w.t()
    rel = {r: ((torch.ops.kp.fp8_linear(x, w, None, r, E4M3, E5M2) - exact)[0].norm() / exact[0].norm()).item()
           for r in ("tensorwise", "rowwise")}
    assert rel["rowwise"] < 0.1 < rel["tensorwise"]  # the small row underflows under one tensor scale


def test_saturation_zero_amax_and_finite_results():
    w = torch.randn(16, 32)
    zeros = torch.ops.kp.fp8_linear(torch.zeros(4, 32), w, None, "tensorwise", E4M3, E5M2)
    assert torch.equal(zeros, torch.zeros(4, 16))  # scale 1 for an all-zero tensor, no 0/0
    big = torch.ops.kp.fp8_linear(torch.full((2, 32), 1e30), w, None, "rowwise", E4M3, E5M2)
    assert torch.isfinite(big).all()  # scaled into range, never cast past the format's max
    assert fp8_max(E4M3) == 448.0 and fp8_max(E5M2) == 57344.0


def test_opcheck_and_bad_arguments():
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    torch.library.opcheck(torch.ops.kp.fp8_linear.default, (x, w, torch.randn(16), "rowwise", E4M3, E5M2))
    with pytest.raises(ValueError, match="recipe 'delayed'"):
        torch.ops.kp.fp8_linear(x, w, None, "delayed", E4M3, E5M2)
    with pytest.raises(ValueError, match="FP8 dtype"):
        torch.ops.kp.fp8_linear(x, w, None, "tensorwise", torch.bfloat16, E5M2)


def test_mi300_fnuz_formats_quantize_the_same_way():
    """ROCm MI300's formats (``float8_e4m3fnuz`` forward, ``float8_e5m2fnuz`` gradients; max 240 and 57344)."""
    fwd, bwd = torch.float8_e4m3fnuz, torch.float8_e5m2fnuz
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(20, 32, generator=g) * 5).requires_grad_()
    w = (torch.randn(16, 32, generator=g) / 3).requires_grad_()
    out = torch.ops.kp.fp8_linear(x, w, None, "tensorwise", fwd, bwd)
    torch.testing.assert_close(out, q(x.detach(), fwd, False) @ q(w.detach(), fwd, False).t(), rtol=1e-6, atol=1e-5)
    grad = torch.randn(20, 16, generator=g)
    gx, gw = torch.autograd.grad(out, [x, w], grad)
    torch.testing.assert_close(gx, q(grad, bwd, False) @ q(w.detach().t(), fwd, False).t(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gw, q(grad.t(), bwd, False) @ q(x.detach().t(), fwd, False).t(), rtol=1e-6, atol=1e-5)
    assert fp8_max(fwd) == 240.0
