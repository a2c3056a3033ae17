"""Masks that read a small per-row tensor: padding flags, document ids, lifted to a ``mask_mod`` that reads it.

transformers' sdpa path builds a padded batch's mask as ``causal &
padding[b, kv_idx]`` and a packed batch's as ``causal & (ids[b, q_idx] ==
ids[b, kv_idx])``, where ``padding`` is the caller's ``attention_mask`` and
``ids`` the document ids it derives from ``position_ids``. Those tensors are
data: the mask cannot be run at compile time. ``lift_data_mask`` lifts it op
by op as ``mask_mod.py`` does, with one more op: ``aten.index.Tensor`` of a
bool or integer tensor at index-arithmetic positions, which the ``mask_mod``
reads at run time (flex passes it to the kernel as a buffer). Proof: every
op between the mask and those reads is integer or boolean arithmetic, which
the lift models exactly, and the read positions are checked in bounds on the
static grid. The block mask comes from the data-free conjuncts (``causal``
above), each proven on the grid, with no block marked full: ``mask_mod``
then runs in every block the structure keeps, so the result is the mask's.

Only bool ``attn_mask`` tensors are lifted: SDPA gives a row with no key 0,
as flex does; an additive mask gives such a row uniform weights instead.

Before (transformers 5.24, ``sdpa_mask`` with a padding ``attention_mask``)::

    %le = aten.le.Tensor(%kv_idx, %q_idx)
    %index = aten.index.Tensor(%attention_mask, [%batch_idx, %kv_idx])   : b8[2, 1, 1, 32]
    %and_2 = aten.__and__.Tensor(%and_1, %index)
    %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, %expand)

After (the tag ``attention-kernels`` reads; on a flex device)::

    mask_mod = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & attention_mask[b, kv_idx]
    %flex_attention = flex_attention(%q, %k, %v, ..., (causal blocks, none full), ..., (), (%attention_mask,))
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import fx

from ...core.graph import erase_dead, val
from .layout import gqa_source
from .mask_mod import _exactly_modelled, _known, _lift, describe, lift_mask_mod
from .fields import Field
from .reads import _ENV, DATA_KEY

aten = torch.ops.aten
_AND = (aten.bitwise_and.Tensor, aten.__and__.Tensor, aten.logical_and.default)
_BLOCKS: "OrderedDict[tuple, tuple]" = OrderedDict()


@dataclass
class DataMask:
    mask_mod: Callable  # mask_mod(b, h, q_idx, kv_idx); reads ``data`` from ``reads._ENV``, which replace_sdpa fills
    data: tuple  # the graph nodes it reads
    structure: Optional[Callable]  # the data-free conjuncts as a mask_mod (None: every pair)
    text: str


def lift_data_mask(keep: fx.Node, L, S, B) -> Optional[DataMask]:
    """``keep`` (bool ``[B or 1, 1, L or 1, S or 1]``) as a ``DataMask``, or None. Static lengths only."""
    if not all(isinstance(x, int) for x in (L, S, B)):
        return None
    memo: dict = {}
    lifted = _lift(keep, memo)
    data = tuple(memo.get(DATA_KEY, ()))
    if not isinstance(lifted, Field) or not data or len(lifted.shape) > 4:
        return None
    sizes = {1: S, 2: L, 3: 1, 4: B}
    varies = {}
    for p in range(1, len(lifted.shape) + 1):
        if _known(lifted.shape[-p] == 1):
            continue
        if not _known(lifted.shape[-p] == sizes[p]) or p == 3:
            return None  # a mask over heads, or one that does not cover the scores' grid
        varies[p] = True
    if not _exactly_modelled(keep, stop=frozenset(data)):
        return None
    rank = len(lifted.shape)

    def mask_mod(b, h, q_idx, kv_idx):
        index = {1: kv_idx, 2: q_idx, 3: h, 4: b}
        return lifted.f({p: index[p] if p in varies else 0 for p in range(1, rank + 1)})

    structure = None
    for leaf in _conjuncts(keep):
        if _reads(leaf, set(data)):
            continue
        part = lift_mask_mod(leaf, L, S)  # data-free: proven on the grid
        if part is not None:
            structure = part if structure is None else _both(structure, part)
    return DataMask(mask_mod, data, structure, describe(mask_mod))


def _both(a: Callable, b: Callable) -> Callable:
    return lambda *ix: a(*ix) & b(*ix)


def _conjuncts(node: fx.Node) -> list:
    if isinstance(node, fx.Node) and node.target in _AND:
        return [c for a in node.args[:2] for c in _conjuncts(a)]
    return [node]


def _reads(node, data: set) -> bool:
    seen, work = set(), [node]
    while work:
        n = work.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n in data:
            return True
        seen.add(n)
        work.extend(n.all_input_nodes)
    return False


def _superset_blocks(structure: Optional[Callable], L: int, S: int, device: torch.device, block: int = 128):
    """``(kv_num_blocks, kv_indices)`` of every block ``structure`` keeps a pair in (none marked full)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    key = (describe(structure) if structure else "all", L, S, str(device), block)
    if key in _BLOCKS:
        _BLOCKS.move_to_end(key)
        return _BLOCKS[key]
    with unset_fake_temporarily(), torch.no_grad():
        qb, kb = -(-L // block), -(-S // block)
        if structure is None:
            keep = torch.ones(qb, kb, dtype=torch.bool)
        else:
            grid = torch.as_tensor(structure(None, None, torch.arange(L)[:, None], torch.arange(S)[None, :]))
            grid = torch.nn.functional.pad(grid.expand(L, S), (0, kb * block - S, 0, qb * block - L))
            keep = grid.reshape(qb, block, kb, block).any(3).any(1)
        num = keep.sum(-1).to(torch.int32)
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        _BLOCKS[key] = (num[None, None].to(device), order[None, None].contiguous().to(device))
    if len(_BLOCKS) > 64:
        _BLOCKS.popitem(last=False)
    return _BLOCKS[key]


def replace_sdpa(gm: fx.GraphModule, sdpa: fx.Node, dm: DataMask, kernel_options: Optional[dict] = None) -> None:
    """``flex_attention`` with ``dm``'s mask_mod (its data as buffers) in place of ``sdpa``."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from .flex import _splice, _trace

    q, k, v = sdpa.args[:3]
    gqa = bool(sdpa.kwargs.get("enable_gqa"))
    k0, v0 = gqa_source(k), gqa_source(v)
    if k0 and v0 and k0[1] == v0[1]:
        k, v, gqa = k0[0], v0[0], True
    qv = val(q)
    L, S = qv.shape[-2], val(k).shape[-2]
    num, order = _superset_blocks(dm.structure, L, S, qv.device)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        template = BlockMask.from_kv_blocks(num, order, None, None, BLOCK_SIZE=128, mask_mod=None, seq_lengths=(L, S))
    scale = sdpa.kwargs.get("scale")

    def attend(q, k, v, *data):
        block_mask = copy.copy(template)
        block_mask.mask_mod = dm.mask_mod
        _ENV.append(tuple(data))  # in dm.data's order: the slots the lifted reads index
        try:
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                  kernel_options=kernel_options)
        finally:
            _ENV.pop()

    traced = _trace(attend, qv, val(k), val(v), *(val(d) for d in dm.data))
    with gm.graph.inserting_before(sdpa):
        out = _splice(gm, traced, (q, k, v, *dm.data), ("data-mask", dm.text, L, S, str(qv.device)))
    out.meta.update({k_: v_ for k_, v_ in sdpa.meta.items() if k_ != "val"})
    out.meta["kp_note"] = f"flex_attention output; mask_mod reads data: {dm.text}"
    sdpa.replace_all_uses_with(out)
    erase_dead([sdpa, *[a for a in sdpa.args[1:4] if isinstance(a, fx.Node)]])
