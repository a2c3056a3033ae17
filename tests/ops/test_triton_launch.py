"""``ops/triton_launch.Launcher``: which calls reuse a compiled kernel, and the argument list it launches with.

The CUDA launch itself runs on the GPU machine (``scripts/gpu_fp8_check.py``
calls every kernel twice and compares); here a stand-in kernel records what
the launcher would pass to Triton.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from kp_compiler.ops import triton_launch  # noqa: E402


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("fast", args))


class FakeKernel:
    arg_names = ["x_ptr", "n", "stride", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def runner(*args, **kw):
            self.log.append(("compile", grid, args, tuple(sorted(kw.items()))))
            return FakeCompiled(self.log)
        return runner


class CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA device 0 (the launcher only reads these)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(triton_launch, "_stream", lambda device: 7)
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: False)
    kernel = FakeKernel()
    launch = triton_launch.Launcher(kernel)
    launch.fast = True
    return kernel, launch


def test_a_repeated_specialization_launches_the_kept_kernel_with_every_argument(launcher):
    kernel, launch = launcher
    x = torch.zeros(64).as_subclass(CudaLike)
    launch((4, 2), x, 100, 32, FLAG=True, BLOCK=64, num_warps=4)
    launch((5,), x, 200, 48, FLAG=True, BLOCK=64, num_warps=4)  # same key: 100/200 neither 1 nor /16; 32/48 both /16
    assert [e[0] for e in kernel.log] == ["compile", "fast"]
    # grid padded to 3 dims, the stream, the handles, no hooks, then runtime args and constexprs in the kernel's order
    assert kernel.log[1][1] == (5, 1, 1, 7, "fn", "meta", None, None, None, x, 200, 48, 64, True)
    assert launch.stats == {"fast": 1, "slow": 1}


@pytest.mark.parametrize("change", ["int is 1", "int not /16", "misaligned", "dtype", "constexpr", "option", "int64"])
def test_anything_triton_specializes_on_compiles_again(launcher, change):
    kernel, launch = launcher
    x = torch.zeros(64).as_subclass(CudaLike)
    base = dict(args=(x, 100, 32), kw=dict(BLOCK=64, FLAG=True, num_warps=4))
    launch((1,), *base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "int is 1":
        args[2] = 1
    elif change == "int not /16":
        args[2] = 33
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16).as_subclass(CudaLike)
    elif change == "constexpr":
        kw["BLOCK"] = 128
    elif change == "option":
        kw["num_warps"] = 8
    else:
        args[1] = 2**31 + 4
    launch((1,), *args, **kw)
    assert [e[0] for e in kernel.log] == ["compile", "compile"]


def test_cpu_tensors_and_unverified_versions_take_the_plain_launch(monkeypatch):
    kernel = FakeKernel()
    launch = triton_launch.Launcher(kernel)
    launch.fast = True
    x = torch.zeros(64)
    for _ in range(2):
        launch((1,), x, 100, 32, BLOCK=64, FLAG=True)
    assert [e[0] for e in kernel.log] == ["compile", "compile"]
    monkeypatch.setattr(triton, "__version__", "9.9.0")
    assert not triton_launch._version_ok()


def test_host_helpers_equal_tritons():
    """``cdiv`` and ``next_power_of_2``: Triton's host helpers without their JIT wrapper, equal to them."""
    for n in [*range(0, 70), 127, 128, 129, 1023, 1024, 1025, 2**20 - 1, 2**20, 2**31 + 5]:
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 128):
            assert triton_launch.cdiv(n, b) == triton.cdiv(n, b), (n, b)
