"""``kp::routed_experts_tables``: ``kp::routed_experts`` in inference graphs, weights read through address tables.

The expert weights are named by a handle to address tables made when the graph was compiled, not passed on
every call.

Handing 3 x E weight tensors to an op costs host time at every call: for E=64 on the H200's host, 0.29 ms per
decode-size call through the dispatcher against 0.19 ms for the same function without the weight lists
(``bench/results/2026-12-02-h200-moe-dispatch-8abb686.txt``), about half the GPU time of the step. So an
inference graph whose expert weights are all graph inputs calls this op instead (``passes/moe/tables.py``)::

    before: %r = kp.routed_experts.default(%x, %ids, %w, [%g0, ..., %g63], [%u0, ...], [%d0, ...], 'silu')
    after:  %r = kp.routed_experts_tables.default(%x, %ids, %w, 3, 'silu')    # 3: the handle

``ExpertTables.refresh`` runs before every call of the compiled graph (a ``PassContext`` hook) with the
weights the graph was called with: when one has moved (a parameter reassigned, a state dict loaded with
``assign=True``, or another layer sharing the compiled graph), the new addresses are copied into the table
before the op reads them. Weights updated in place are read as they are, as by ``kp::routed_experts``. The
op has no autograd formula: the pass emits it only in graphs compiled without a backward.

On CUDA the Triton kernels read the tables (``lowering/moe.py``); elsewhere the reference loop runs on the
weights the last refresh saw (kept by weak reference).
"""

from __future__ import annotations

import importlib.util
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..core.devices import DeviceInfo
from ..core.persistent import persistent
from .routed_experts import NO_BIASES, reference, stacked
from .expert_addresses import Roles, _addresses, roles, supported

_data_ptr = torch.Tensor.data_ptr


@dataclass
class ExpertTables:
    """One op's expert weights: a device table of their addresses, and what the kernels read besides.

    ``table`` is ``[3 * E]`` int64 (gate, up, down; the gate slot holds up's addresses for ungated experts) and
    ``tables`` its three views, which the kernels read. A refresh copies another weight set's addresses into
    ``table`` in place (a CUDA graph captured over the op reads the table by address), from a device copy kept
    per weight set (``known``): layers that share one compiled graph (a model compiled per layer) switch with
    one device-to-device copy, not a host-to-device one per call.
    """

    roles: Roles
    table: torch.Tensor
    tables: tuple
    addresses: tuple  # every weight's data_ptr as last seen, gate then up then down
    refs: list  # per role, weak references to its weights (the reference path)
    known: dict = field(default_factory=dict)  # addresses -> a device table for them
    readable: bool = True  # the kernels can read the weights last seen (else the op runs the reference)

    def weights(self) -> tuple:
        """``(w_gate, w_up, w_down)`` as last seen by ``refresh``; raises if one was freed."""
        out = []
        for role in self.refs:
            ws = [r() for r in role]
            if any(w is None for w in ws):
                raise RuntimeError("kp::routed_experts_tables: an expert weight was freed since the last call of "
                                   "the graph that holds it")
            out.append(ws)
        return tuple(out)

    def refresh(self, w_gate: Sequence, w_up: Sequence, w_down: Sequence) -> None:
        """Point the tables at these weights (same shapes and strides: Dynamo guards them) if they moved."""
        now = tuple(map(_data_ptr, (*w_gate, *w_up, *w_down)))
        if now == self.addresses:
            return
        self.addresses = now
        self.refs = [[weakref.ref(w) for w in ws] for ws in (w_gate, w_up, w_down)]
        src = self.known.get(now)
        if src is None:
            # Alignment is all that can change under Dynamo's guards; unreadable weights run the reference.
            self.readable = supported(w_up[0], w_gate, w_up, w_down)
            if not self.readable:
                warnings.warn("kp::routed_experts_tables: the expert weights moved to addresses the Triton kernels "
                              "cannot read (not 16-byte aligned); running the op's reference for them", RuntimeWarning)
                return
            src = _device_table(w_gate, w_up, w_down, keep=len(self.known) < _KNOWN)
            if len(self.known) < _KNOWN:
                self.known[now] = src
        self.readable = True
        self.table.copy_(src)


_KNOWN = 64  # weight sets kept per op (past this many, a new set's table is made per switch)


def _device_table(w_gate, w_up, w_down, keep: bool) -> torch.Tensor:
    """``[3 * E]`` int64 addresses (gate, up, down) on the weights' device; made outside any CUDA-graph pool
    where ``keep`` (``core/persistent.py``)."""
    def build():
        up = _addresses(w_up)
        return torch.tensor([*(_addresses(w_gate) if w_gate else up), *up, *_addresses(w_down)],
                            dtype=torch.int64).to(w_up[0].device)
    return persistent(build) if keep else build()


def fused_kernels(device: DeviceInfo) -> bool:
    """The Triton kernels run the op on ``device`` (``lowering/moe.choose``'s rule for them)."""
    return (device.kind == "cuda" and device.capability is not None and device.capability >= (8, 0)
            and importlib.util.find_spec("triton") is not None)


_HANDLES: list = []  # handle -> ExpertTables; never dropped (a captured CUDA graph reads the tables by address)


def make(x: torch.Tensor, w_gate: Sequence, w_up: Sequence, w_down: Sequence) -> Optional[int]:
    """A handle to tables of these weights, or None where the kernels cannot read them (``supported``).
    ``x``: a tensor (fake is fine) with the activations' dtype and device."""
    if not supported(x, w_gate, w_up, w_down) or any(stacked(ws) for ws in (w_gate, w_up, w_down) if ws):
        return None
    src = _device_table(w_gate, w_up, w_down, keep=True)
    table = persistent(src.clone)
    E = len(w_up)
    up = table[E:2 * E]
    addresses = tuple(map(_data_ptr, (*w_gate, *w_up, *w_down)))
    entry = ExpertTables(roles(w_gate, w_up, w_down), table, (table[:E] if w_gate else up, up, table[2 * E:]),
                         addresses, [[weakref.ref(w) for w in ws] for ws in (w_gate, w_up, w_down)],
                         known={addresses: src})
    _HANDLES.append(entry)
    return len(_HANDLES) - 1


def entry(handle: int) -> ExpertTables:
    if not 0 <= handle < len(_HANDLES):
        raise ValueError(f"kp::routed_experts_tables: no tables under handle {handle}")
    return _HANDLES[handle]


# Defined without ``custom_op``: its Python autograd layer (and its output-aliasing check) cost more host time
# per call than the op's own Python (7 us against 2 on a CPU core). Without an autograd kernel, a call that
# needs a gradient gets torch's autograd fallback (the pass emits the op only in graphs without a backward).
_LIB = torch.library.Library("kp", "FRAGMENT")
_LIB.define("routed_experts_tables(Tensor x, Tensor ids, Tensor weights, int handle, str activation) -> Tensor")


def routed_experts_tables(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, handle: int,
                          activation: str) -> torch.Tensor:
    """The reference (devices without the Triton kernels): the expert loop on the weights last seen."""
    w_gate, w_up, w_down = entry(handle).weights()
    with torch.no_grad():
        return reference(x, ids, weights, w_gate, w_up, w_down, activation, NO_BIASES)


_LIB.impl("routed_experts_tables", routed_experts_tables, "CompositeExplicitAutograd")


@torch.library.register_fake("kp::routed_experts_tables")
def _(x, ids, weights, handle, activation):
    return x.new_empty(x.shape)
