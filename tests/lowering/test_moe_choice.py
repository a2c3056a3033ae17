"""The routed-experts implementation table, and the grouped-GEMM path against the reference loop."""

import pytest
import torch

from kp_compiler.lowering.capabilities import DeviceInfo
from kp_compiler.lowering.moe import choose
from kp_compiler.ops import grouped_experts
from kp_compiler.ops.routed_experts import ACTIVATIONS, reference

H100, A100 = DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (8, 0))


@pytest.mark.parametrize("device,dtype,aligned,impl", [
    (H100, torch.bfloat16, True, "grouped_mm"),
    (H100, torch.bfloat16, False, "reference"),
    (H100, torch.float32, True, "reference"),
    (A100, torch.bfloat16, True, "reference"),
    (DeviceInfo("cpu"), torch.bfloat16, True, "reference"),
    (DeviceInfo("xla"), torch.bfloat16, True, "reference"),
])
def test_implementation_table(device, dtype, aligned, impl):
    assert choose(device, dtype, aligned) == impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grouped_mm_path_equals_the_loop(dtype, activation):
    """torch._grouped_mm runs on the CPU (torch 2.9 and 2.13): the sorted, grouped path is checked here."""
    T, d, f, E, k = 40, 16, 32, 5, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) % (E - 1)  # one expert idle
    w = torch.rand(T, k, generator=g).to(dtype)
    G, U = ([torch.randn(f, d, generator=g).to(dtype) for _ in range(E)] for _ in range(2))
    Dn = [torch.randn(d, f, generator=g).to(dtype) for _ in range(E)]
    assert grouped_experts.aligned(x, G)
    got = grouped_experts.forward(x, ids, w, G, U, Dn, activation)
    want = reference(x, ids, w, G, U, Dn, activation)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype is torch.bfloat16 else 1e-5, atol=1e-2)
