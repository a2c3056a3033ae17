"""Dynamo graph -> canonical pre-dispatch ATen IR.

Dynamo hands a backend a torch-IR ``GraphModule`` (calls to ``torch.*``,
``nn.functional.*``, tensor methods) and example inputs. Passes want one
spelling per op, so the graph is re-traced with ``make_fx(pre_dispatch=True)``
under Dynamo's own fake mode: ``x @ w``, ``torch.matmul`` and ``x.matmul`` all
become ``aten.matmul.default``; ``F.linear`` becomes ``aten.linear.default``.
Autograd has not run yet, so a replacement op that owns its backward (SDPA,
``flex_attention``, a ``torch.library`` op with ``register_autograd``) gets a
correct backward for free when the lowering runs AOTAutograd.

Higher-order ops that carry their own backward (a custom
``autograd.Function``, activation checkpointing) are kept whole behind one
opaque op (``core/regions.py``): ``make_fx`` would inline their forward and
drop the backward.

Symbolic shapes survive: the fake inputs come from ``fake_mode.from_tensor``,
which returns the (memoized) fake tensors Dynamo traced with, sizes such as
``s0`` included; SymInt inputs stay SymInt placeholders.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode

from . import regions
from .graph import snapshot


def fake_mode_of(example_inputs: Sequence[Any]) -> FakeTensorMode:
    """The fake mode Dynamo traced with, or a fresh one outside Dynamo."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    if mode is not None:
        return mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fakeify(fake_mode: FakeTensorMode, example_inputs: Sequence[Any]) -> list[Any]:
    """Fake versions of the inputs in ``fake_mode`` (memoized: Dynamo's own fake tensors). A fake tensor of
    another mode (the example values Dynamo recorded on its graph's nodes, which the backend's mode does not
    own: ``core/plain_regions.py`` passes them) is made again in ``fake_mode``, symbolic sizes kept."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and not (
            isinstance(x, torch._subclasses.FakeTensor) and x.fake_mode is fake_mode
        ):
            x = fake_mode.from_tensor(x)
        out.append(x)
    return out


def canonicalize(
    gm: fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[fx.GraphModule, FakeTensorMode, list[Any]]:
    """Trace ``gm`` to pre-dispatch ATen IR.

    Returns the canonical graph module (same calling convention as ``gm``,
    every node carrying ``meta["val"]``), the fake mode, and the fake inputs
    that shape propagation reuses later.

    Before (Dynamo, torch IR)::

        %l_x_ = placeholder()
        %matmul = call_function[torch.matmul](%l_x_, %l_w_)
        %gelu = call_function[torch.nn.functional.gelu](%matmul)

    After::

        %l_x_ = input() : f32[4, 16]
        %matmul = aten.matmul.default(%l_x_, %l_w_) : f32[4, 32]
        %gelu = aten.gelu.default(%matmul) : f32[4, 32]
    """
    fake_mode = fake_mode_of(example_inputs)
    fake_inputs = fakeify(fake_mode, example_inputs)
    traced, keys = gm, []
    if regions.present(gm):  # hide them from make_fx on a copy: the Dynamo graph stays the fallback
        traced = fx.GraphModule(gm, snapshot(gm))
        keys = regions.hide(traced)
    with fake_mode:
        cgm = make_fx(traced, pre_dispatch=True)(*fake_inputs)
    regions.release_with(cgm, keys)
    carry_dynamo_metadata(gm, cgm)
    cgm.meta["kp_source"] = "canonical"
    return cgm, fake_mode, fake_inputs


def unregister_traced_constants(gm: fx.GraphModule, known: set) -> None:
    """Keep make_fx's tensor constants (``_tensor_constant0``) as plain attributes.

    make_fx registers them as buffers; AOTAutograd then looks every buffer up
    in Dynamo's ``_param_name_to_source`` and fails on these, which have no
    source. As plain attributes they are constants to AOTAutograd, as in
    Dynamo's own graphs.
    """
    for name in [n for n in gm._buffers if n not in known]:
        tensor = gm._buffers.pop(name)
        setattr(gm, name, tensor)


def carry_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give the canonical graph what Dynamo attached to its own.

    AOTAutograd reads ``gm.meta["dynamo_compile_id"]``, ``gm._param_name_to_source``
    and each placeholder's ``_dynamo_source`` and ``meta["tensor_dict"]`` to learn
    which inputs are parameters (static): without them CUDA graphs copy every
    parameter on every replay and Inductor checks every input's alignment.
    Placeholders also keep Dynamo's readable names (``l_x_``, not ``arg0_1``).
    """
    old = [n for n in src.graph.nodes if n.op == "placeholder"]
    new = [n for n in dst.graph.nodes if n.op == "placeholder"]
    if len(old) != len(new):
        return
    for key, value in src.meta.items():
        dst.meta.setdefault(key, value)
    if hasattr(src, "_param_name_to_source"):
        dst._param_name_to_source = src._param_name_to_source
        unregister_traced_constants(dst, set(src._param_name_to_source))
    for o, n in zip(old, new):
        for key, value in o.meta.items():
            n.meta.setdefault(key, value)
        if hasattr(o, "_dynamo_source"):
            n._dynamo_source = o._dynamo_source
        if hasattr(fx.Node, "_rename"):
            n._rename(o.name)
            n.target = n.name
    dst.recompile()
