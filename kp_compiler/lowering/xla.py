"""The ``xla`` lowering: torch_xla's openxla Dynamo path (TPU, XLA:CPU)."""

from __future__ import annotations

import importlib.util


class XlaUnavailable(RuntimeError):
    pass


def lower(gm, example_inputs, mode: str, inductor_config: dict):
    if importlib.util.find_spec("torch_xla") is None:
        raise XlaUnavailable(
            "kernelpytorch: lowering 'xla' needs torch_xla, which is not installed "
            "(torch_xla 2.9 pairs with torch 2.9: pip install torch==2.9.0 torch_xla==2.9.0); "
            "use options={'lowering': 'inductor'} for CPU/GPU tensors"
        )
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("openxla")(gm, list(example_inputs))
