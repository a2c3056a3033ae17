"""``ops/triton_skinny.py``: the few-row linear kernel against float64, and what it refuses.

Without a GPU it runs in Triton's interpreter (``tests/conftest.py``), which truncates fp32 to bf16 where the GPU
rounds to nearest: the tolerance is a bf16 ulp or two of relative L2 error. Sizes that are not multiples of the
tiles exercise every mask.
"""

import pytest
import torch

from kp_compiler.ops import triton_skinny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (3, 40, 96), (16, 64, 32), (17, 33, 80), (40, 20, 48)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_equals_float64(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    y = triton_skinny.skinny_linear(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    exact = x.double() @ w.double().T
    tol = 8e-3 if dtype is torch.bfloat16 else 1e-3
    assert rel(y, exact) < tol
    assert rel(y, exact) > 0 or dtype is torch.float16  # the kernel ran in 16-bit: a bf16 result is not exact


@pytest.mark.parametrize("config", triton_skinny.CANDIDATES[:3])
def test_every_tile_candidate(config):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g).to(DEVICE, torch.bfloat16)  # K not a multiple of BK
    w = torch.randn(70, 300, generator=g).to(DEVICE, torch.bfloat16)
    y = triton_skinny.skinny_linear(x, w, config)
    assert rel(y, x.double() @ w.double().T) < 8e-3


def test_strided_rows():
    """Rows of ``x`` and ``w`` with a stride above ``K`` (views of wider tensors) are read where they are."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 96, generator=g).to(DEVICE, torch.bfloat16)[:, :64]
    w = torch.randn(40, 80, generator=g).to(DEVICE, torch.bfloat16)[:, :64]
    assert triton_skinny.supported(x, w)
    assert rel(triton_skinny.skinny_linear(x, w), x.double() @ w.double().T) < 8e-3


@pytest.mark.parametrize("case", ["rows", "fp32", "mixed", "transposed", "shape"])
def test_supported_refuses(case):
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    if case == "rows":
        x = torch.randn(triton_skinny.MAX_ROWS + 1, 32, dtype=torch.bfloat16)
    elif case == "fp32":
        x, w = x.float(), w.float()
    elif case == "mixed":
        w = w.half()
    elif case == "transposed":
        w = torch.randn(32, 16, dtype=torch.bfloat16).T
    else:
        w = torch.randn(16, 31, dtype=torch.bfloat16)
    assert not triton_skinny.supported(x, w)
    assert triton_skinny.supported(torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16))
