"""Reads of a small per-row tensor inside a lifted mask: ``padding[b, kv_idx]``, ``ids[b, q_idx]``.

``mask_mod.py`` lifts ``aten.index.Tensor(data, [positions])`` with
``read_field`` when every position is index arithmetic: a ``Field`` whose
value is ``data`` at those positions, read at run time from ``_ENV`` (the
tensors the flex call passes as buffers, ``data_masks.py``). The data nodes
a lift read are listed in its memo under ``DATA_KEY``.

Before::

    %index = aten.index.Tensor(%attention_mask, [%batch_idx, %kv_idx])   : b8[2, 1, 1, 32]

After::

    Field(lambda ix: attention_mask[ix[4], ix[1]], (2, 1, 1, 32))        # describe(): attention_mask[b, kv_idx]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from ...core.graph import val
from .fields import Field, _Sym, _broadcast_to, _result_shape

aten = torch.ops.aten
DATA_KEY = "__data_reads__"  # memo key of the data nodes a lift read
_ENV: list = []  # stack of tuples: the tensors a lifted mask_mod reads, in its lift's DATA_KEY order
_READABLE = (torch.bool, torch.int32, torch.int64)


class NoData(LookupError):
    """A lifted mask read its data with no tensors in ``_ENV`` (outside a flex splice: a compile-time grid check)."""


def read_field(node: fx.Node, memo: dict, lift: Callable):
    """``aten.index.Tensor(data, [positions])`` with every position index arithmetic: a Field reading ``data``."""
    data, indices = node.args[0], node.args[1]
    data, as_bool = _through_bool_cast(data)
    dv = val(data)
    if (not isinstance(data, fx.Node) or not isinstance(dv, torch.Tensor) or dv.dtype not in _READABLE
            or len(indices) != dv.dim() or not 1 <= dv.dim() <= 2 or lift(data, memo) is not None):
        return None
    fields = [lift(i, memo) if isinstance(i, fx.Node) else None for i in indices]
    if not all(isinstance(f, Field) for f in fields) or not _in_bounds(fields, dv.shape):
        return None
    shape = _result_shape(*(f.shape for f in fields))
    fields = [_broadcast_to(f, shape) for f in fields]
    if any(f is None for f in fields):
        return None
    reads = memo.setdefault(DATA_KEY, [])
    if data not in reads:
        reads.append(data)
    slot = reads.index(data)  # where the flex splice puts this tensor in _ENV (a node is no key under Dynamo)
    return Field(lambda ix: _read(data, slot, [f.f(ix) for f in fields], as_bool), shape)


def _in_bounds(fields: list, sizes) -> bool:
    """Each position field, run on its own static grid, stays in ``0 .. size - 1`` (flex reads unchecked)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    for f, size in zip(fields, sizes):
        if not isinstance(size, int) or not all(isinstance(d, int) for d in f.shape):
            return False
        rank = len(f.shape)
        with unset_fake_temporarily(), torch.no_grad():
            ix = {p: torch.arange(f.shape[-p]).reshape([-1] + [1] * (p - 1)) for p in range(1, rank + 1)}
            try:
                pos = torch.as_tensor(f.f(ix))
            except NoData:  # a position that itself reads data: not index arithmetic
                return False
            if pos.dtype.is_floating_point or pos.numel() == 0 or int(pos.min()) < 0 or int(pos.max()) >= size:
                return False
    return True


def _through_bool_cast(data):
    """``(source, True)`` when ``data`` is an integer tensor cast to bool (``attention_mask.bool()``): the
    mask reads the caller's tensor itself and tests ``!= 0``, which is what the cast computes."""
    casts = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
    if isinstance(data, fx.Node) and data.target in casts and getattr(val(data), "dtype", None) is torch.bool:
        src = data.args[0]
        same_device = getattr(val(src), "device", None) == val(data).device  # a cast that also moves is not looked through
        if isinstance(src, fx.Node) and getattr(val(src), "dtype", None) in (torch.int32, torch.int64) and same_device:
            return src, True
    return data, False


def _read(data: fx.Node, slot: int, idx: list, as_bool: bool = False):
    if any(isinstance(i, _Sym) for i in idx):
        text = f"{data.name}[{', '.join(str(i) for i in idx)}]"
        return _Sym(f"{text} != 0" if as_bool else text, 0 if as_bool else 9)
    if not _ENV:
        raise NoData(data.name)
    value = _ENV[-1][slot][tuple(idx)]
    return value != 0 if as_bool else value
