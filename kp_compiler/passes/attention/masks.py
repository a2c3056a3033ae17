"""Proofs about attention masks built by index arithmetic.

``is_causal_keep_mask(node, L, S)`` is True only when ``node`` is provably the
boolean "keep" mask ``kv_index <= q_index`` over an ``L x S`` score matrix
(top-left aligned, as SDPA's ``is_causal`` defines it). Recognized spellings:

- ``arange(S)[None, :] <= arange(L)[:, None]`` (``le``), its mirror
  ``arange(L)[:, None] >= arange(S)[None, :]`` (``ge``);
- ``tril(ones(L, S))`` turned to bool (``.bool()``, ``!= 0``, ``> 0``, ``== 1``).

Anything else is not claimed causal; the caller then passes the mask tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ...core.graph import val

aten = torch.ops.aten

_UNSQUEEZE = (aten.unsqueeze.default,)
_RESHAPE = (aten.view.default, aten.reshape.default)


def _arange_length(node) -> Optional[int]:
    """``n`` when ``node`` is ``arange(n)`` or ``arange(0, n)`` with step 1 (int dtype)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.arange.default:
        end = node.args[0]
    elif node.target is aten.arange.start and node.args[0] == 0:
        end = node.args[1]
    elif node.target is aten.arange.start_step and node.args[0] == 0 and node.args[2] == 1:
        end = node.args[1]
    else:
        return None
    dtype = node.kwargs.get("dtype")
    if dtype is not None and dtype.is_floating_point:
        return None
    return end


def _skip_full_slices(node):
    """``x[:]`` along any dim (start 0, no end, step 1) is ``x``; dynamic traces keep them."""
    while isinstance(node, fx.Node) and node.target is aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        start, end, step = args[2], args[3], args[4]
        if start not in (None, 0) or step not in (None, 1) or not (end is None or (isinstance(end, int) and end >= 2**62)):
            return node
        node = node.args[0]
    return node


def _axis(node) -> Optional[tuple[str, object]]:
    """("q", n) for an index column ``[n, 1]``, ("k", n) for an index row ``[n]`` / ``[1, n]``."""
    node = _skip_full_slices(node)
    n = _arange_length(node)
    if n is not None:
        return ("k", n)
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    inner = _arange_length(_skip_full_slices(node.args[0]))
    if inner is None:
        return None
    if node.target in _UNSQUEEZE:
        dim = node.args[1]
        return ("q", inner) if dim in (1, -1) else ("k", inner) if dim in (0, -2) else None
    if node.target in _RESHAPE:
        shape = list(node.args[1])
        if shape in ([inner, 1], [-1, 1]):
            return ("q", inner)
        if shape in ([1, inner], [1, -1]):
            return ("k", inner)
    return None


def _same(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    a = val(a) if isinstance(a, fx.Node) else a  # a SymInt input node stands for its symbol
    b = val(b) if isinstance(b, fx.Node) else b
    if a is None or b is None:
        return False
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unknown symbolic relation: not proven
        return False


def _compare_is_causal(node: fx.Node, L, S) -> bool:
    if node.target is aten.le.Tensor:
        kv, q = node.args
    elif node.target is aten.ge.Tensor:
        q, kv = node.args
    else:
        return False
    q_axis, kv_axis = _axis(q), _axis(kv)
    if q_axis is None or kv_axis is None or q_axis[0] != "q" or kv_axis[0] != "k":
        return False
    return _same(q_axis[1], L) and _same(kv_axis[1], S)


def _tril_ones_is_causal(node: fx.Node, L, S) -> bool:
    """``tril(ones(L, S))`` as bool."""
    src = None
    if node.target in (aten.to.dtype, aten._to_copy.default):
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
        if dtype is torch.bool:
            src = node.args[0]
    elif node.target in (aten.ne.Scalar, aten.gt.Scalar) and node.args[1] == 0:
        src = node.args[0]
    elif node.target is aten.eq.Scalar and node.args[1] == 1:
        src = node.args[0]
    if not isinstance(src, fx.Node) or src.target is not aten.tril.default:
        return False
    diagonal = src.args[1] if len(src.args) > 1 else src.kwargs.get("diagonal", 0)
    ones = src.args[0]
    if diagonal != 0 or not isinstance(ones, fx.Node) or ones.target is not aten.ones.default:
        return False
    shape = list(ones.args[0])
    return len(shape) == 2 and _same(shape[0], L) and _same(shape[1], S)


def is_causal_keep_mask(node, L, S) -> bool:
    """Proven ``kv_index <= q_index`` over ``L x S`` (True = attend)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    v = val(node)
    if isinstance(v, torch.Tensor) and v.dtype is not torch.bool:
        return False
    return _compare_is_causal(node, L, S) or _tril_ones_is_causal(node, L, S)


def _top_left_slice_source(node, L, S) -> Optional[fx.Node]:
    """The placeholder ``P`` when ``node`` is ``P[..., :L, :S]`` (slices from 0, step 1).

    Slicing the whole buffer (``T == block_size``) canonicalizes to ``aten.alias``: looked through too.
    """
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        return None
    if not (_same(v.shape[-2], L) and _same(v.shape[-1], S)):
        return None
    rank = v.dim()
    while isinstance(node, fx.Node) and node.target in (aten.slice.Tensor, aten.alias.default):
        if node.target is aten.alias.default:
            node = node.args[0]
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, step = args[1], args[2], args[4]
        if dim % rank not in (rank - 2, rank - 1) or start not in (None, 0) or step not in (None, 1):
            return None
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def tril_buffer_source(keep, L, S) -> Optional[fx.Node]:
    """The buffer ``P`` when the keep mask reads ``P[..., :L, :S] != 0`` (or ``not (... == 0)``).

    Only the structure is checked here; whether ``P`` really holds a lower
    triangle of ones is a fact about its value, which the caller must check
    on the example input and guard at run time.
    """
    if isinstance(keep, tuple):  # ("not", not_keep)
        not_keep = keep[1]
        if isinstance(not_keep, fx.Node) and not_keep.target is aten.eq.Scalar and not_keep.args[1] == 0:
            return _top_left_slice_source(not_keep.args[0], L, S)
        return None
    if isinstance(keep, fx.Node) and keep.target is aten.ne.Scalar and keep.args[1] == 0:
        return _top_left_slice_source(keep.args[0], L, S)
    return None


def holds_lower_triangle(buffer: torch.Tensor) -> bool:
    """Every trailing square of ``buffer`` is a lower triangle of nonzeros with zeros above. False for a fake
    tensor (no data to check: Dynamo's DDP optimizer compiles the graphs it splits on fake example inputs)."""
    from torch._subclasses.fake_tensor import is_fake

    if buffer.dim() < 2 or is_fake(buffer):
        return False
    n, m = buffer.shape[-2:]
    tril = torch.ones(n, m, dtype=torch.bool, device=buffer.device).tril()
    return bool(torch.equal(buffer != 0, tril.expand_as(buffer)))
