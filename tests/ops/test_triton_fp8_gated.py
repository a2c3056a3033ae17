"""``ops/triton_fp8_gated.py`` against ``fp8_gated_quant``, through Triton's interpreter on the CPU (or a GPU).

The kernels compute the activation with Triton's own exp and erf, so a value
can differ from torch's by an fp32 ulp and land on the other side of an FP8
rounding boundary: the scales must agree to fp32 rounding, the dequantized
values to one FP8 step where they are not negligible, the error against the
exact values to the emulation's, and 95% of the bytes exactly.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kp_compiler.ops import fp8_gated_quant, triton_fp8_gated  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton runs neither on a GPU nor in the interpreter here")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def inputs(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, cols, generator=g) * s).to(dtype).to(DEVICE) for s in (3.0, 2.0, 0.5)]


def same_cast(got, want, ref, dtype, what):
    """``got`` against the emulation's ``want`` and the fp32 values ``ref`` both cast."""
    q, qt, s = got
    rq, rqt, rs = want
    assert q.dtype == dtype and q.shape == rq.shape and qt.shape == rqt.shape, what
    torch.testing.assert_close(s.float().cpu(), rs.float().cpu(), rtol=1e-6, atol=0, msg=what)
    a, b = q.float().cpu(), rq.float().cpu()
    # one FP8 step wherever the value is not negligible (at 1e-4 of the largest, an activation's derivative
    # in its far tail is computed with erf's cancellation, by torch and Triton alike)
    top = torch.finfo(dtype).max
    step = 2.0 ** -(3 if dtype == E4M3 else 2)
    big = b.abs() >= top * 1e-4
    assert ((a - b).abs()[big] <= step * b.abs()[big]).all(), what
    assert (q.view(torch.uint8).cpu() == rq.view(torch.uint8).cpu()).float().mean() > 0.95, what
    ref = ref.float().cpu()
    err = lambda t, sc: ((t * sc.float().cpu() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(a, s) <= err(b, rs) * 1.01 + 1e-6, what  # as close to the exact values as the emulation
    assert torch.equal(qt.view(torch.uint8)[:, :q.shape[0]].t().cpu(), q.view(torch.uint8).cpu()), what
    assert (qt.view(torch.uint8)[:, q.shape[0]:] == 0).all(), what  # the padding columns: zeros
    assert a.abs().max() > 0, what


SHAPES = [(30, 48), (64, 160), (5, 20)]  # 30 and 5 rows: padded to 32 and 16; 160 and 20: partial column tiles


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_cast_matches_the_emulation(act, shape, dtype):
    g, u, _ = inputs(*shape, dtype)
    got = triton_fp8_gated.gated_pair(g, u, act, E4M3)
    want = fp8_gated_quant.gated_pair(g.cpu(), u.cpu(), act, E4M3)
    same_cast(got, want, fp8_gated_quant.gated(g.cpu(), u.cpu(), act), E4M3, f"{act} {shape}")


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_casts_match_the_emulation(act, shape):
    g, u, d = inputs(*shape, torch.bfloat16, seed=1)
    got = triton_fp8_gated.gated_grad_pairs(d, g, u, act, E5M2)
    want = fp8_gated_quant.gated_grad_pairs(d.cpu(), g.cpu(), u.cpu(), act, E5M2)
    dg, du = fp8_gated_quant.gated_grads(d.cpu(), g.cpu(), u.cpu(), act)
    same_cast(got[:3], want[:3], dg, E5M2, f"dg {act} {shape}")
    same_cast(got[3:], want[3:], du, E5M2, f"du {act} {shape}")
    assert not torch.allclose(got[2], got[5])  # two scales, one per gradient
    # each its own tensor: cuBLASLt (H200) refused a scale at a 4-byte offset into a shared buffer
    assert got[2].storage_offset() == 0 and got[5].storage_offset() == 0


def test_non_finite_values_saturate_and_zeros_get_scale_one():
    g, u, _ = inputs(16, 32, torch.float32, seed=2)
    g[0, 0], u[1, 1] = float("inf"), float("-inf")
    q, _, s = triton_fp8_gated.gated_pair(g, u, "silu", E4M3)
    rq, _, rs = fp8_gated_quant.gated_pair(g.cpu(), u.cpu(), "silu", E4M3)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-6, atol=0)
    for i in (0, 1):  # saturated, not NaN, with the emulation's sign
        assert q.float()[i, i].abs().item() == 448 and q.float()[i, i].item() == rq.float()[i, i].item()
    zq, zqt, zs = triton_fp8_gated.gated_pair(torch.zeros_like(g), torch.ones_like(u), "silu", E4M3)
    assert zs.item() == 1.0 and (zq.float() == 0).all()


def test_bad_input_is_named():
    g, u, _ = inputs(16, 32, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        triton_fp8_gated.gated_pair(g, u, "relu", E4M3)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        triton_fp8_gated.gated_pair(g.t(), u, "silu", E4M3)
