"""``kp::flex_block_mask``: a FlexAttention block mask for lengths known only at run time.

With symbolic sequence lengths the block mask cannot be a constant of the
graph. The attention pass registers the lifted ``mask_mod`` under its text
(``register``) and calls this op with the run-time lengths; the op builds the
block mask on the first call for each
``(mask, L, S, device)`` and serves it from a bounded cache afterwards
(``CACHE_SIZE`` entries, least recently used dropped first); it equals
``create_block_mask``'s (tests/lowering/test_flex_dynamic.py). One compiled
graph then serves every length, with no guard on the length itself.

The op returns the eight block-mask tensors as fresh copies on every call
(eight small copies), so Inductor may reuse or free those buffers without
touching the cache.

Before (in the graph, lengths symbolic)::

    block mask: not expressible (``create_block_mask`` needs the lengths)

After::

    %blocks = kp.flex_block_mask.default('kv_idx <= q_idx', %s0, %s0, cuda:0)
    %kv_num_blocks = getitem(%blocks, 0) : i32[1, 1, ((s0 + 127)//128)]   # ... and the other seven
    %flex_attention = higher_order.flex_attention(%q, %k, %v, ..., (%s0, %s0, %kv_num_blocks, ...), ...)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from ..core.persistent import capturing, persistent

BLOCK = 128  # create_block_mask's default block size, both axes
CACHE_SIZE = 64
_MASKS: dict = {}  # mask text -> mask_mod
_CACHE: "OrderedDict[tuple, list]" = OrderedDict()  # (mask, L, S, device) -> the eight block tables
_BAND = 16 * BLOCK  # query rows evaluated at once: bounds the dense mask to 2048 x S


def register(key: str, mask_mod: Callable) -> None:
    """Make ``mask_mod`` callable by the op under ``key`` (its ``describe`` text: equal text, equal mask)."""
    _MASKS[key] = mask_mod


def _blocks(n):
    return (n + BLOCK - 1) // BLOCK


@torch.library.custom_op("kp::flex_block_mask", mutates_args=())
def flex_block_mask(key: str, L: int, S: int, device: torch.device) -> list[torch.Tensor]:
    cache_key = (key, L, S, str(device))
    parts = _CACHE.get(cache_key)
    if parts is None and capturing():  # the graph's own tables, in its pool: not kept (core/persistent.py)
        return _build(key, L, S, device)
    if parts is None:
        parts = persistent(lambda: _build(key, L, S, device))
        _CACHE[cache_key] = parts
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(cache_key)
    return [p.clone() for p in parts]


@flex_block_mask.register_fake
def _(key, L, S, device):
    return [torch.empty(shape, dtype=torch.int32, device=device) for shape in shapes(L, S)]


def shapes(L, S) -> list:
    """The eight block-mask tensors' shapes (``FIELDS`` order) for ``L x S``; ``L``, ``S`` may be symbolic."""
    nq, nkv = _blocks(L), _blocks(S)
    return [(1, 1, nq), (1, 1, nq, nkv)] * 2 + [(1, 1, nkv), (1, 1, nkv, nq)] * 2


def _build(key: str, L: int, S: int, device: torch.device) -> list:
    """The block mask's eight tensors at ``L x S``, from the mask evaluated on broadcast index tensors.

    ``create_block_mask`` and ``BlockMask.from_kv_blocks`` are not used here:
    both run ``vmap``, which fails inside a compiled graph's call
    (AOTAutograd's runtime dispatch mode). The lifted masks are elementwise in
    ``q_idx`` and ``kv_idx``, so broadcasting gives the same dense mask, one
    band of query blocks at a time; the query-side tables are the same
    ordering over the transposed block grid.
    """
    if key not in _MASKS:
        raise RuntimeError(f"kp::flex_block_mask: no mask registered as {key!r} in this process "
                           "(the graph was compiled elsewhere); recompile with torch.compile")
    mask_mod = _MASKS[key]
    nq, nkv = _blocks(L), _blocks(S)
    kv_idx = torch.arange(nkv * BLOCK, device=device)[None, :]
    partial, full = [], []
    with torch.no_grad():
        for row0 in range(0, nq * BLOCK, _BAND):
            rows = min(_BAND, nq * BLOCK - row0)
            q_idx = torch.arange(row0, row0 + rows, device=device)[:, None]
            keep = torch.as_tensor(mask_mod(0, 0, q_idx, kv_idx), device=device).expand(rows, nkv * BLOCK)
            keep = keep & (q_idx < L) & (kv_idx < S)  # the padding past L and S is masked out
            tiles = keep.reshape(rows // BLOCK, BLOCK, nkv, BLOCK)
            any_, all_ = tiles.any(3).any(1), tiles.all(3).all(1)
            partial.append(any_ & ~all_)
            full.append(all_)
    partial, full = torch.cat(partial)[None, None], torch.cat(full)[None, None]
    parts = [*_ordered(partial), *_ordered(full), *_ordered(partial.transpose(-1, -2)),
             *_ordered(full.transpose(-1, -2))]
    want = shapes(L, S)
    if [tuple(p.shape) for p in parts] != [tuple(w) for w in want]:
        raise RuntimeError(f"kp::flex_block_mask: block shapes {[tuple(p.shape) for p in parts]}, expected {want}")
    return parts


def _ordered(blocks: torch.Tensor) -> tuple:
    """Per query block: how many key blocks are set, and their indices first (in order), as flex wants."""
    count = blocks.sum(-1).to(torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def block_mask(parts, L, S, mask_mod: Callable):
    """A ``BlockMask`` over the op's eight tensors for ``L x S`` (symbolic lengths work, inside a trace)."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask((L, S), *parts, (BLOCK, BLOCK), mask_mod)
