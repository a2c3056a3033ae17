import importlib.util
import os

if not os.path.exists("/dev/nvidiactl"):
    # No NVIDIA GPU: Triton kernels run on the CPU through Triton's interpreter. The switch is
    # read when a kernel (triton.language's own helpers included) is defined, so it is set
    # before torch, which may import triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch._dynamo

if os.environ.get("PJRT_DEVICE") and importlib.util.find_spec("torch_xla") is not None:
    # The XLA lane: bring the XLA device up before any backward runs. Autograd's engine sizes
    # its per-device queues at the first backward; an XLA device that appears later trips an
    # internal assert there (seen with torch 2.9 + torch_xla 2.9 when tests/xla ran last).
    import torch_xla
    import torch_xla.core.xla_model as xm

    torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
