"""Lowerings: turn a rewritten ATen graph into the callable Dynamo runs.

``select`` picks one by device and options; each lowering lives in its own
module and shares the signature ``lower(gm, example_inputs, mode, config, dump)``.
"""

from . import moe as _moe  # noqa: F401  (registers kp::routed_experts' CUDA implementation)
from . import linear_act as _linear_act  # noqa: F401  (registers kp::linear_act's and kp::gated_linear's CUDA implementations)
from . import linear_cross_entropy as _linear_cross_entropy  # noqa: F401  (registers kp::linear_cross_entropy's CUDA rows kernel)
from .registry import LOWERINGS, input_devices, lower, select

__all__ = ["LOWERINGS", "input_devices", "lower", "select"]
