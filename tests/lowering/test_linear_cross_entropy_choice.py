"""``lowering/linear_cross_entropy.py``: the rows' implementation on CUDA, and the CUDA function's wiring (run on
the CPU: the kernel in Triton's interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.lowering import linear_cross_entropy as lowering


def test_choice_and_forcing(monkeypatch):
    monkeypatch.delenv("KP_LCE_ROWS", raising=False)
    assert lowering.choose(torch.bfloat16, triton=True) == "triton"
    assert lowering.choose(torch.float32, triton=True) == "triton"
    assert lowering.choose(torch.float64, triton=True) == "aten"
    assert lowering.choose(torch.bfloat16, triton=False) == "aten"
    monkeypatch.setenv("KP_LCE_ROWS", "aten")
    assert lowering.choose(torch.bfloat16, triton=True) == "aten"
    monkeypatch.setenv("KP_LCE_ROWS", "cutlass")
    with pytest.raises(ValueError, match="KP_LCE_ROWS='cutlass'"):
        lowering.choose(torch.bfloat16, triton=True)


@pytest.mark.parametrize("rows", ["triton", "aten"])
def test_the_cuda_function_equals_eager(monkeypatch, rows):
    if rows == "triton" and not lowering._HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("KP_LCE_ROWS", rows)
    calls = []
    real = lowering._rows
    monkeypatch.setattr(lowering, "_rows",
                        lambda *a, **k: (calls.append(lowering.choose(a[0].dtype)), real(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    b = torch.randn(30, generator=g)
    y = torch.randint(0, 30, (9,), generator=g)
    loss, gh, gw, gb = lowering._cuda(h, w, b, y, -100, 0.0, "sum", 2.0, 4)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(2.0 * torch.tanh(F.linear(hh, ww, bb) / 2.0), y, reduction="sum")
    ref.backward()
    assert calls == [rows] * 3  # three chunks
    torch.testing.assert_close(loss, ref.detach())
    for got, want in ((gh, hh.grad), (gw, ww.grad), (gb, bb.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
