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


def test_cublaslt_epilogue_only_where_measured_and_exact(monkeypatch):
    """cuBLASLt's epilogue: the measured (K, N) with GELU(tanh); never exact GELU, gated forms, stored
    pre-activations (``epilogue=None``) or fp32."""
    monkeypatch.delenv("KP_LINEAR_ACT_KERNEL", raising=False)
    pick = lambda dtype=torch.bfloat16, k=4096, n=16384, gated=False, epilogue="gelu_tanh": lowering.choose(  # noqa: E731
        H200, dtype, k, n, gated, True, triton=True, epilogue=epilogue)
    assert pick() == "cublaslt"
    assert pick(torch.float16) == "cublaslt"
    assert pick(epilogue="gelu") == "reference"  # cuBLASLt's GELU is the tanh form
    assert pick(epilogue=None) == "reference"
    assert pick(epilogue="relu") == "reference"  # not measured
    assert pick(n=4096) == "reference"
    assert pick(torch.float32) == "reference"
    assert pick(gated=True) == "reference"
    assert lowering.choose(CPU, torch.bfloat16, 4096, 16384, False, True, epilogue="gelu_tanh") == "reference"
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", "cublaslt")
    assert pick(n=64, epilogue="relu") == "cublaslt"
    assert pick(epilogue="silu") == "reference"  # forced, but cuBLASLt has no SiLU epilogue


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_cublaslt_implementation_equals_the_reference(monkeypatch, activation, bias):
    """The epilogue path (``torch._addmm_activation``; on the CPU its ATen fallback) against float64, for a 3-D
    input with and without bias; the training op (pre-activations stored) never takes it."""
    monkeypatch.setattr(lowering, "_device_info", lambda device: H200)
    monkeypatch.setenv("KP_LINEAR_ACT_KERNEL", "cublaslt")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g).bfloat16()
    w = (torch.randn(40, 32, generator=g) / 32 ** 0.5).bfloat16()
    b = torch.randn(40, generator=g).bfloat16() if bias else None
    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    got = lowering.IMPLS["linear_act"](x, w, b, activation)
    u = F.linear(x.double(), w.double(), None if b is None else b.double())
    want = F.gelu(u, approximate="tanh") if activation == "gelu_tanh" else F.relu(u)
    assert calls == [{"use_gelu": activation == "gelu_tanh"}]
    assert got.shape == (2, 9, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    calls.clear()
    lowering.IMPLS["linear_act_train"](x, w, b, activation)
    assert calls == []  # the backward needs the pre-activation, which the epilogue does not return
