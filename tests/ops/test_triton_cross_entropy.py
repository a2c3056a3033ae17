"""``ops/triton_cross_entropy.py`` under Triton's interpreter: equal to ``linear_cross_entropy.rows`` (ATen), and
``linear_cross_entropy.forward`` through it equal to eager."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kp_compiler.ops import linear_cross_entropy as lce  # noqa: E402
from kp_compiler.ops import triton_cross_entropy as tce  # noqa: E402


@pytest.mark.parametrize("vocab", [37, 4100])  # one block; two, the second partial
@pytest.mark.parametrize("smoothing, softcap", [(0.0, 0.0), (0.1, 0.0), (0.0, 3.0), (0.1, 3.0)])
def test_rows_equal_aten_in_fp32(vocab, smoothing, softcap):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, vocab, generator=g) * 4
    y = torch.randint(0, vocab, (4,), generator=g)
    y[1] = -100
    scale = torch.tensor(0.25)
    want_loss, want_grad = lce.rows(z.clone(), y, -100, smoothing, softcap, scale)
    got_loss, got_grad = tce.rows(z.clone(), y, -100, smoothing, softcap, scale)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert got_loss[1] == 0 and not got_grad[1].any()  # the ignored row: no loss, no gradient


def test_rows_write_the_gradient_in_place_in_bf16():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(3, 300, generator=g) * 3).bfloat16()
    y = torch.randint(0, 300, (3,), generator=g)
    want_loss, want_grad = lce.rows(z.clone(), y, -100, 0.0, 0.0, torch.tensor(1.0))
    z_in = z.clone()
    got_loss, got_grad = tce.rows(z_in, y, -100, 0.0, 0.0, torch.tensor(1.0))
    assert got_grad.data_ptr() == z_in.data_ptr() and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=2 ** -8)  # an ulp of bf16 near 1


def test_forward_through_the_kernel_equals_eager():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(45, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 45, (10,), generator=g)
    y[3] = -100
    ref = F.cross_entropy(F.linear(h, w), y, label_smoothing=0.1)
    ref_h, ref_w = torch.autograd.grad(ref, [h, w])
    loss, gh, gw, _ = lce.forward(h.detach(), w.detach(), None, y, -100, 0.1, "mean", 0.0, 4, rows_fn=tce.rows)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gh, ref_h)
    torch.testing.assert_close(gw, ref_w)


def test_supported():
    assert tce.supported(torch.empty(2, 8, dtype=torch.bfloat16))
    assert not tce.supported(torch.empty(8, 2).t())
    assert not tce.supported(torch.empty(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("block, reverse", [(1024, True), (1024, False), (8192, True)])
def test_every_tile_the_sweep_tries_equals_aten(block, reverse):
    """``launch`` with the tiles ``scripts/gpu_lce_rows_sweep.py`` times: the second pass in reverse block order
    (the last partial block first) and a tile wider than the row (lanes that never see a logit) give the same
    losses and gradients."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 4100, generator=g) * 4
    y = torch.tensor([5, -100, 4099])
    scale = torch.tensor(0.5)
    want_loss, want_grad = lce.rows(z.clone(), y, -100, 0.1, 3.0, scale)
    got_grad, got_loss = z.clone(), torch.empty(3)
    tce.launch(got_grad, y, scale, got_loss, -100, 0.1, 3.0, block, 4, reverse)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_the_tile_override(monkeypatch):
    monkeypatch.setenv("KP_LCE_TILE", "8192,16,1")
    assert tce.config(128256) == (8192, 16, True)
    for bad in ("8192,16", "3000,8,0", "4096,12,0", "4096,8,2", "a,b,c", "4096,8,1,0", "131072,8,1"):
        monkeypatch.setenv("KP_LCE_TILE", bad)
        with pytest.raises(ValueError, match="KP_LCE_TILE"):
            tce.config(128256)
    monkeypatch.delenv("KP_LCE_TILE")
    assert tce.config(128256) == (4096, 8, True) and tce.config(100) == (128, 4, True)
