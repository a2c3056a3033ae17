"""The CUDA kernel path (``ops/fp8_cuda.py``) run on the CPU: ``torch._scaled_mm`` layouts, fused casts.

torch 2.13's CPU ``_scaled_mm`` takes the same operands as CUDA's (without
checking the layouts, which ``scaled_mm`` checks itself), so the GPU code's
operand layouts, scales, padding and compiled casts are tested here against
the emulation. Skipped where the CPU ``_scaled_mm`` is missing.
"""

import pytest
import torch

from kp_compiler.ops import fp8, fp8_cuda, fp8_scaled
from kp_compiler.ops.fp8_quant import EMULATED

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


pytestmark = pytest.mark.skipif(not fp8_cuda.cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")

# torch._scaled_mm multiplies the FP8 products and then scales; the emulation scales, then multiplies
# in fp32. torch 2.13's and 2.9's CPU kernels happen to give the same bits, torch 2.11's differ in the
# last place (seen on the GPU machine). A wrong layout or scale is off by O(1), so a few fp32 ulps do.
EXACT = dict(rtol=1e-5, atol=1e-5)


def inputs(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, 32, generator=g) * 3, torch.randn(64, 32, generator=g) / 4,
            torch.randn(64, generator=g), torch.randn(m, 64, generator=g))


@pytest.mark.parametrize("m", [48, 40])  # 40 tokens: the weight gradient's contraction is padded to 48
def test_tensorwise_kernels_equal_the_emulation_to_fp32_rounding(m):
    x, w, b, g = inputs(m)
    torch.testing.assert_close(fp8.forward(fp8_cuda.KERNELS, x, w, b, "tensorwise", E4M3),
                               fp8.forward(EMULATED, x, w, b, "tensorwise", E4M3), **EXACT)
    for got, want in zip(fp8.backward(fp8_cuda.KERNELS, g, x, w, "tensorwise", E4M3, E5M2),
                         fp8.backward(EMULATED, g, x, w, "tensorwise", E4M3, E5M2)):
        torch.testing.assert_close(got, want, **EXACT)
    sx, sw = torch.tensor(2.0 / 448), torch.tensor(0.5 / 448)
    for got, want in zip(fp8_scaled.backward(fp8_cuda.KERNELS, g, x, w, sx, sw, torch.zeros(4), "delayed", E4M3, E5M2, 0.0),
                         fp8_scaled.backward(EMULATED, g, x, w, sx, sw, torch.zeros(4), "delayed", E4M3, E5M2, 0.0)):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.skipif(not fp8_cuda.cpu_scaled_mm(rowwise=True), reason="this torch's CPU _scaled_mm takes no rowwise scales")
def test_rowwise_kernels_match_the_emulation_up_to_the_bf16_output():
    x, w, b, g = inputs(40, seed=1)
    got, want = fp8.forward(fp8_cuda.KERNELS, x, w, b, "rowwise", E4M3), fp8.forward(EMULATED, x, w, b, "rowwise", E4M3)
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-2)  # rowwise _scaled_mm writes bf16
    assert not torch.equal(got, want)
    for got, want in zip(fp8.backward(fp8_cuda.KERNELS, g, x, w, "rowwise", E4M3, E5M2),
                         fp8.backward(EMULATED, g, x, w, "rowwise", E4M3, E5M2)):
        torch.testing.assert_close(got, want, rtol=8e-3, atol=5e-2)


def test_layouts_and_alignment_are_checked():
    a = torch.randn(32, 32).to(E4M3)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="row-major"):
        fp8_cuda.scaled_mm(a.t(), s, a, s, torch.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_cuda.scaled_mm(torch.randn(8, 24).to(E4M3), s, torch.randn(32, 24).to(E4M3), s, torch.float32)
    assert fp8_cuda.pad_tokens(torch.ones(40, 3)).shape == (48, 3)
    assert fp8_cuda.pad_tokens(torch.ones(40, 3))[40:].abs().sum() == 0


def test_the_compiled_casts_run_inside_a_compiled_graph():
    """The kernel's casts are themselves torch.compile'd; they must work when an Inductor graph calls the op."""
    @torch.library.custom_op("kptest::fp8_scaled_mm_linear", mutates_args=(), device_types="cpu")
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fp8.forward(fp8_cuda.KERNELS, x, w, None, "tensorwise", E4M3)

    linear.register_fake(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    x, w, _, _ = inputs(48, seed=2)
    compiled = torch.compile(lambda x, w: torch.relu(linear(x, w)) * 2, backend="kernelpytorch")
    torch.testing.assert_close(compiled(x, w), torch.relu(fp8.forward(EMULATED, x, w, None, "tensorwise", E4M3)) * 2,
                               **EXACT)


def test_fast_accumulation_reaches_the_forward_gemm_only(monkeypatch):
    """``fast_accum`` is ``use_fast_accum`` of the forward ``torch._scaled_mm``; gradient GEMMs never get it."""
    from kp_compiler.ops import fp8_train

    calls = []
    real = torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x, w, b, g = inputs(48, seed=5)
    for fast in (True, False):
        calls.clear()
        out, *saved = fp8_train.forward(fp8_cuda.KERNELS, x, w, b, E4M3, fast)
        fp8_train.backward(fp8_cuda.KERNELS, g, *saved, E5M2, w.dtype)
        fp8.forward(fp8_cuda.KERNELS, x, w, b, "tensorwise", E4M3, False, fast)
        assert calls == [fast, False, False, fast]
