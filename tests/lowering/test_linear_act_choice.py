"""Which implementation runs ``kp::linear_act`` / ``kp::gated_linear`` on CUDA (``lowering/linear_act.py``), and the
CUDA implementations' wiring, run on the CPU with the device stood in for (the Triton branch in the interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from kp_compiler.core.devices import DeviceInfo
from kp_compiler.lowering import linear_act as lowering

H200 = DeviceInfo("cuda", (9, 0), "NVIDIA H200")
CPU = DeviceInfo("cpu", None, "cpu")


def test_nothing_is_chosen_that_was_not_measured(monkeypatch):
    monkeypatch.delenv("KP_LINEAR_ACT_KERNEL", raising=False)
    assert lowering.choose(H200, torch.bfloat16, 4096, 14336, True, True, triton=True) == "reference"
    monkeypatch.setitem(lowering.TRITON_SHAPES, ((9, 0), True), {(4096, 14336)})
    assert lowering.choose(H200, torch.bfloat16, 4096, 14336, True, True, triton=True) == "triton"
    assert lowering.choose(H200, torch.bfloat16, 4096, 14336, False, True, triton=True) == "reference"  # not gated
    assert lowering.choose(H200, torch.float32, 4096, 14336, True, True, triton=True) == "reference"
    assert lowering.choose(H200, torch.bfloat16, 4096, 14336, True, False, triton=True) == "reference"  # unreadable
    assert lowering.choose(CPU, torch.bfloat16, 4096, 14336, True, True, triton=True) == "reference"


def test_the_environment_forces_where_it_can_run_and_rejects_other_values(monkeypatch):
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", "triton")
    assert lowering.choose(H200, torch.bfloat16, 64, 64, True, True, triton=True) == "triton"
    assert lowering.choose(CPU, torch.bfloat16, 64, 64, True, True, triton=True) == "reference"
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", "reference")
    monkeypatch.setitem(lowering.TRITON_SHAPES, ((9, 0), True), {(64, 64)})
    assert lowering.choose(H200, torch.bfloat16, 64, 64, True, True, triton=True) == "reference"
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="KP_LINEAR_ACT_KERNEL='cutlass'"):
        lowering.choose(H200, torch.bfloat16, 64, 64, True, True, triton=True)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("name", sorted(lowering.IMPLS))
def test_cuda_implementations_return_what_the_ops_return(monkeypatch, impl, name):
    """Each CUDA implementation, through the Triton kernel (interpreter) and the reference: the outputs the op's
    schema promises, equal to the ATen reference (bf16: within eager's error against float64)."""
    if impl == "triton" and not lowering._HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(lowering, "_device_info", lambda device: H200)
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", impl)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g).bfloat16()
    w = lambda: (torch.randn(40, 32, generator=g) / 32 ** 0.5).bfloat16()  # noqa: E731
    gated = name.startswith("gated")
    wg, wu, bu = (w() if gated else None), w(), torch.randn(40, generator=g).bfloat16()
    args = (x, wg, wu, None, bu, "silu") if gated else (x, wu, bu, "gelu_tanh")
    got = lowering.IMPLS[name](*args)
    d = x.double()
    u = F.linear(d, wu.double(), bu.double())
    if gated:
        pre_g = F.linear(d, wg.double())
        want = (F.silu(pre_g) * u, pre_g, u) if name.endswith("train") else F.silu(pre_g) * u
    else:
        want = (F.gelu(u, approximate="tanh"), u) if name.endswith("train") else F.gelu(u, approximate="tanh")
    got_t, want_t = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got_t) == len(want_t)
    for a, b in zip(got_t, want_t):
        assert a.dtype is torch.bfloat16 and a.shape == b.shape
        assert (a.double() - b).abs().max().item() < 0.05 * b.abs().max().item()
