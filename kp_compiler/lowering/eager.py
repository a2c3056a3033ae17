"""The ``eager`` lowering: run the rewritten graph op by op, as it is.

For debugging a pass without Inductor in the way, for fast compiles, and as
the path that runs our own kernels unfused. Autograd runs through each ATen
op's own derivative. ``mode`` has no effect here.
"""

from __future__ import annotations


def lower(gm, example_inputs, mode: str, inductor_config: dict, dump=None):
    return gm
