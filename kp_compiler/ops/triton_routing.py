"""``expert_routing.schedule`` as one Triton kernel launch (the CUDA path of the routed experts).

The ATen version sorts, counts, scans and scatters in about twenty launches;
at decode size each costs more host time than its GPU work. Here one program
per expert builds its own part of the same schedule:

1. count every expert's assignments (``tl.histogram`` over ``ids`` in chunks),
   pad each count to the block and scan: this expert's run is
   ``[start, end)`` of the padded rows;
2. walk ``ids`` in order and store each assignment of this expert at
   ``start + rank`` (a running count plus a cumsum: the stable order the ATen
   version gets from a stable argsort);
3. fill the run's padding rows and its blocks' expert; the last program also
   fills the rows and blocks past every run (padding, expert ``E``).

The result is bit-identical to ``expert_routing.schedule`` (tested), with no
host sync and static sizes. Each program reads all of ``ids`` twice: ``T*k``
int64s, 256 KiB at T=4096, top-8, served from L2, in chunks of up to 2048.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .expert_routing import Schedule, capacity
from .triton_launch import Launcher, next_power_of_2


@triton.jit
def _route(ids_ptr, rows_ptr, block_expert_ptr, ends_ptr, shifts_ptr, n, cap,
           E: tl.constexpr, E_POW2: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENDS: tl.constexpr,
           SHIFTS: tl.constexpr):
    e = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    start = 0
    while start < n:
        offs = start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_POW2, mask=offs < n)
        start += CHUNK
    padded = (counts + BLOCK - 1) // BLOCK * BLOCK
    ends = tl.cumsum(padded, 0)
    mine = experts == e
    end = tl.sum(tl.where(mine, ends, 0))
    begin = end - tl.sum(tl.where(mine, padded, 0))
    count = tl.sum(tl.where(mine, counts, 0))
    if ENDS:
        tl.store(ends_ptr + e, end)
    if SHIFTS:  # padded rows before this expert's run: its padded row r is row r - shift of the unpadded order
        tl.store(shifts_ptr + e, begin - tl.sum(tl.where(experts < e, counts, 0)))
    seen = 0
    start = 0
    while start < n:
        offs = start + lanes
        hit = (tl.load(ids_ptr + offs, mask=offs < n, other=-1) == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, 0) - 1
        tl.store(rows_ptr + begin + rank, offs.to(tl.int32), mask=hit == 1)
        seen += tl.sum(hit)
        start += CHUNK
    pad = begin + count + tl.arange(0, BLOCK)
    tl.store(rows_ptr + pad, n, mask=pad < end)
    b = begin // BLOCK
    while b < end // BLOCK:
        blocks = b + lanes
        tl.store(block_expert_ptr + blocks, e, mask=blocks < end // BLOCK)
        b += CHUNK
    if e == E - 1:  # past the last run: padding rows, blocks of no expert
        total = tl.sum(padded)
        r = total
        while r < cap:
            tail = r + lanes
            tl.store(rows_ptr + tail, n, mask=tail < cap)
            r += CHUNK
        b = total // BLOCK
        while b < cap // BLOCK:
            blocks = b + lanes
            tl.store(block_expert_ptr + blocks, E, mask=blocks < cap // BLOCK)
            b += CHUNK


_ROUTE = Launcher(_route)


def schedule(ids: torch.Tensor, experts: int, block: int) -> Schedule:
    """``expert_routing.schedule(ids, experts, block)`` in one launch (``ids`` contiguous on a Triton device)."""
    return _schedule(ids, experts, block, None)


def schedule_with_ends(ids: torch.Tensor, experts: int, block: int):
    """``(schedule, ends)``: ``schedule(ids, experts, block)`` and each expert's padded end row (int32 ``[E]``),
    so a kernel can walk one expert's rows ``[ends[e - 1], ends[e])``."""
    ends = torch.empty(experts, dtype=torch.int32, device=ids.device)
    return _schedule(ids, experts, block, ends), ends


def schedule_with_shifts(ids: torch.Tensor, experts: int, block: int):
    """``(schedule, shifts)``: ``schedule(ids, experts, block)`` and, per expert, how many padding rows come before
    its run (int32 ``[E]``): its padded row ``r`` is row ``r - shifts[e]`` of ``sort_by_expert``'s order."""
    shifts = torch.empty(experts, dtype=torch.int32, device=ids.device)
    return _schedule(ids, experts, block, None, shifts), shifts


def sort_by_expert(ids: torch.Tensor, experts: int):
    """``(order, ends)``: the assignments sorted by expert, stably (int32 ``[T*k]``), and each expert's end
    in that order (int32 ``[E]``, the ``offs`` of ``torch._grouped_mm``), in one launch: the schedule with
    a block of one row has no padding. Equal to ``argsort(ids.flatten(), stable=True)`` and the cumsum of
    the counts (tested)."""
    ends = torch.empty(experts, dtype=torch.int32, device=ids.device)
    return _schedule(ids, experts, 1, ends).rows, ends


def _schedule(ids, experts, block, ends, shifts=None) -> Schedule:
    flat = ids.reshape(-1)
    n = flat.numel()
    cap = capacity(n, experts, block)
    rows = torch.empty(cap, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(cap // block, dtype=torch.int32, device=ids.device)
    e_pow2 = next_power_of_2(experts)
    chunk = max(e_pow2, min(2048, next_power_of_2(n)))  # few passes: each program walks all of ids
    _ROUTE((experts,), flat, rows, block_expert, rows if ends is None else ends, rows if shifts is None else shifts,
           n, cap, E=experts, E_POW2=e_pow2, BLOCK=block, CHUNK=chunk, ENDS=ends is not None,
           SHIFTS=shifts is not None, num_warps=8 if chunk >= 1024 else 4)
    return Schedule(rows, block_expert, block, experts, n)
