"""``kp::fp8_scale_update`` and ``kp::fp8_linear_scaled``: delayed and static scaling, overflow events."""

import pytest
import torch

import kp_compiler.ops  # noqa: F401
from kp_compiler.ops.fp8_scaled import EVENTS, HISTORY, SCALE

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TOP = 448.0


def q(t, s, dtype=E4M3):
    """Reference: quantize-dequantize with a given scale, saturating."""
    top = torch.finfo(dtype).max
    return (t.float() / s).clamp(-top, top).to(dtype).float() * s


def rand(*shape, amax, seed):
    t = (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amax
    t.view(-1)[0] = amax  # the amax, exactly
    return t


def test_delayed_history_and_margin_over_steps():
    state = torch.zeros(HISTORY + 3)
    update = torch.ops.kp.fp8_scale_update
    margin = 1.0
    amaxes = [4.0, 2.0, 8.0, 1.0, 0.5]
    used = []
    for i, a in enumerate(amaxes):
        used.append(update(state, rand(64, amax=a, seed=i), E4M3, margin, "delayed").item())
    # First call: no history, so the current amax; later calls: the max of the previous 3 amaxes.
    want = [4.0, 4.0, 4.0, 8.0, 8.0]
    assert used == pytest.approx([a / TOP * 2 for a in want], rel=1e-6)
    assert state[HISTORY:].tolist() == [0.5, 1.0, 8.0]  # newest first, the oldest two gone
    assert state[SCALE].item() == pytest.approx(8.0 / TOP * 2, rel=1e-6)
    assert state[EVENTS].item() == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_a_bad_amax_keeps_the_previous_scale_and_is_counted(bad):
    state = torch.zeros(HISTORY + 4)
    update = torch.ops.kp.fp8_scale_update
    update(state, rand(32, amax=3.0, seed=0), E4M3, 0.0, "delayed")
    before = state.clone()
    t = torch.zeros(32) if bad == 0.0 else rand(32, amax=1.0, seed=1)
    t[5] = bad
    used = update(state, t, E4M3, 0.0, "delayed")
    assert used.item() == pytest.approx(3.0 / TOP)
    assert torch.equal(state[HISTORY:], before[HISTORY:]) and state[SCALE] == before[SCALE]
    assert state[EVENTS].item() == 1
    frozen = torch.tensor([0.25, 0.0])
    assert update(frozen, t, E4M3, 0.0, "frozen").item() == 0.25 and frozen.tolist() == [0.25, 1.0]


@pytest.mark.parametrize("recipe", ["delayed", "static"])
def test_scaled_linear_forward_and_backward_equal_the_same_quantization_written_out(recipe):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 6, 32, generator=g) * 3).requires_grad_()
    w = (torch.randn(48, 32, generator=g) / 4).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    sx = torch.tensor(2.5 / TOP)  # smaller than amax(x): saturation is part of what is checked
    sw = torch.tensor(0.9 / TOP) if recipe == "delayed" else None
    grad_state = torch.zeros(HISTORY + 2)
    grad_state[SCALE] = 0.3 / 57344.0 if recipe == "delayed" else 0.0
    out = torch.ops.kp.fp8_linear_scaled(x, w, b, sx, sw, grad_state, recipe, E4M3, E5M2, 0.0)
    w_scale = sw if sw is not None else w.detach().abs().amax() / TOP
    x2 = x.detach().reshape(-1, 32)
    want = q(x2, sx) @ q(w.detach(), w_scale).t() + b.detach()
    torch.testing.assert_close(out.reshape(-1, 48), want, rtol=1e-6, atol=1e-5)
    grad = torch.randn(3, 6, 48, generator=g)
    gx, gw, gb = torch.autograd.grad(out, [x, w, b], grad)
    g2 = grad.reshape(-1, 48)
    sg = torch.tensor(0.3 / 57344.0) if recipe == "delayed" else g2.abs().amax() / 57344.0
    torch.testing.assert_close(gx.reshape(-1, 32), q(g2, sg, E5M2) @ q(w.detach().t(), w_scale).t(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gw, q(g2.t(), sg, E5M2) @ q(x2.t(), sx).t(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gb, g2.sum(0))
    if recipe == "delayed":  # the backward recorded the gradient's amax
        assert grad_state[HISTORY].item() == g2.abs().amax().item()
    else:  # static: gradients scale dynamically, the last good scale is kept
        assert grad_state[SCALE].item() == pytest.approx(g2.abs().amax().item() / 57344.0)
    assert not torch.equal(out.reshape(-1, 48), x2 @ w.detach().t() + b.detach())


def test_opcheck():
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    torch.library.opcheck(torch.ops.kp.fp8_linear_scaled.default,
                          (x, w, None, torch.tensor(0.01), torch.tensor(0.01), torch.zeros(4), "delayed",
                           E4M3, E5M2, 0.0))
    torch.library.opcheck(torch.ops.kp.fp8_scale_update.default, (torch.zeros(5), x, E4M3, 0.0, "delayed"))
    with pytest.raises(ValueError, match="scaling 'later'"):
        torch.ops.kp.fp8_scale_update(torch.zeros(5), x, E4M3, 0.0, "later")
