"""The ``xla`` lowering: torch_xla's openxla Dynamo path (TPU; XLA:CPU in tests).

The rewritten graph goes to torch_xla's ``openxla`` backend, which runs
AOTAutograd and hands the forward and backward graphs to XLA, so training
works as with Inductor. Passes see the target through the kernel table
(``passes/attention/kernel_table.py``): no Triton kernel and no FlexAttention is chosen
for XLA; attention stays SDPA, which XLA lowers itself.
"""

from __future__ import annotations

import importlib.util

import torch


class XlaUnavailable(RuntimeError):
    """``lowering="xla"`` cannot run here: torch_xla is missing."""


class XlaDeviceMismatch(XlaUnavailable):
    """``lowering="xla"`` was asked for tensors that are not on an XLA device."""


def lower(gm, example_inputs, mode: str, inductor_config: dict, dump=None):
    if importlib.util.find_spec("torch_xla") is None:
        raise XlaUnavailable(
            "kernelpytorch: lowering 'xla' needs torch_xla, which is not installed "
            "(torch_xla 2.9 pairs with torch 2.9: pip install torch==2.9.0 torch_xla==2.9.0); "
            "use options={'lowering': 'inductor'} for CPU/GPU tensors"
        )
    others = sorted({x.device.type for x in example_inputs if isinstance(x, torch.Tensor)} - {"xla"})
    if others:
        raise XlaDeviceMismatch(
            f"kernelpytorch: lowering 'xla' needs every input on an XLA device, got {others} tensors; "
            "move the model and inputs with .to(torch_xla.device()) or use lowering 'auto'"
        )
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("openxla")(gm, list(example_inputs))
