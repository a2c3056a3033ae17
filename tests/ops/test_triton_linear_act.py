"""The Triton forward of ``kp::linear_act`` / ``kp::gated_linear`` (``ops/triton_linear_act.py``) against float64.

Without a GPU it runs in Triton's interpreter (``tests/conftest.py``): tiny shapes, the same kernel, masks and
group ordering the GPU runs. Sizes that are not multiples of the tiles exercise every mask.
"""

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.ops import triton_linear_act
from kp_compiler.ops.activations import ACTIVATIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(shape, n, dtype, gated, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    w = lambda: (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)  # noqa: E731
    b = lambda: torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None  # noqa: E731
    return x, w() if gated else None, w(), b() if gated else None, b()


def exact(x, wg, wu, bg, bu, activation):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    u = F.linear(d(x), d(wu), d(bu))
    if wg is None:
        return ACTIVATIONS[activation](u), None, u
    g = F.linear(d(x), d(wg), d(bg))
    return ACTIVATIONS[activation](g) * u, g, u


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_equals_float64(activation, gated, bias):
    args = make((2, 9, 40), 37, torch.float32, gated, bias)  # 18 rows, K=40, N=37: partial tiles everywhere
    out, g, u = triton_linear_act.forward(*args, activation, store_pre=True)
    want, want_g, want_u = exact(*args, activation)
    assert out.shape == (2, 9, 37) and out.dtype is torch.float32
    for got, ref in ((out, want), (g, want_g), (u, want_u)):
        if ref is None:
            assert got is None
            continue
        assert (got.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6


def test_without_store_pre_only_the_output_comes_back():
    args = make((5, 24), 20, torch.float32, True, False)
    out, g, u = triton_linear_act.forward(*args, "silu")
    assert g is None and u is None
    torch.testing.assert_close(out.double(), exact(*args, "silu")[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_bfloat16_is_as_close_as_eager(activation):
    args = make((40, 64), 48, torch.bfloat16, True, True, seed=3)
    out, _, _ = triton_linear_act.forward(*args, activation)
    want = exact(*args, activation)[0]
    eager = ACTIVATIONS[activation](F.linear(args[0], args[1], args[3])) * F.linear(args[0], args[2], args[4])
    err = (out.double() - want).abs().max().item()
    assert out.dtype is torch.bfloat16 and err <= 2 * (eager.double() - want).abs().max().item() + 1e-3


@pytest.mark.parametrize("rows", [12, 300])  # the few-rows tiles (BM 16) and the large ones (BM 128)
def test_rows_with_a_stride_and_many_tiles_of_each_kind(rows):
    """A transposed view's rows are made contiguous; several row and column tiles in a partial group of row
    tiles, and K over several steps of the loop, each with a partial last tile."""
    base = torch.randn(200, rows, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x = base.t()  # [rows, 200], stride (1, rows)
    _, wg, wu, bg, bu = make((rows, 200), 300, torch.float32, True, True, seed=6)
    out, _, _ = triton_linear_act.forward(x, wg, wu, bg, bu, "gelu")
    torch.testing.assert_close(out.double(), exact(x, wg, wu, bg, bu, "gelu")[0], rtol=1e-5, atol=1e-6)


def test_supported_names_what_the_kernel_reads():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert triton_linear_act.supported(x, w, w)
    assert not triton_linear_act.supported(x, w.t().contiguous().t())  # unit stride along rows, not K
    assert not triton_linear_act.supported(x, w.double())
