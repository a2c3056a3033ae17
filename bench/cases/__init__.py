"""Benchmark cases as data: a name, a group, and a builder.

A builder takes a ``Scale`` (device, dtype, smoke) and returns a
``Workload``: what gets compiled, its inputs, the work it does (for TFLOP/s
or GB/s), and for training cases the loss that the step backpropagates.
Adding a case is adding one decorated builder to one of these modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Scale:
    device: str
    dtype: torch.dtype
    smoke: bool  # tiny shapes for the CPU smoke run
    timing: str = "latency"  # "latency" or "gpu" (see bench/timing.py)


@dataclass
class Workload:
    model: Any  # nn.Module or function; compiled as a whole
    inputs: tuple
    flops: Optional[float] = None  # useful FLOPs per step
    bytes: Optional[float] = None  # minimal bytes moved per step
    loss: Optional[Callable[[Any], torch.Tensor]] = None  # set for training steps
    output: Callable[[Any], torch.Tensor] = lambda out: out  # the tensor compared for error
    dynamo_config: dict = field(default_factory=dict)
    note: str = ""
    reference_dtype: Optional[torch.dtype] = None  # the error reference's dtype, where float64 cannot run
    kp_options: dict = field(default_factory=dict)  # options every kernelpytorch row of this case gets (fp8)
    more_inputs: list = field(default_factory=list)  # further input tuples one step also runs (other lengths)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    build: Callable[[Scale], Workload]
    train: bool = False
    requires: tuple = ()  # importable modules the case needs
    backends: tuple = ()  # only these backends (a peer's own path: Inductor alone); () = every chosen backend


CASES: dict[str, Case] = {}


def case(name: str, group: str, train: bool = False, requires: tuple = (), backends: tuple = ()):
    def register(build):
        CASES[name] = Case(name, group, build, train, requires, backends)
        return build
    return register


def load_all() -> dict[str, Case]:
    from . import attention, e2e, fp8, linear, loss, masked_models, models, moe  # noqa: F401  (registration)
    return CASES
