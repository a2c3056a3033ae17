"""Top-k routing ids -> a block schedule for grouped expert kernels, with no host sync.

Every (token, slot) assignment ``a = t * k + j`` goes to expert ``ids[t, j]``.
``schedule(ids, experts, block)`` sorts the assignments by expert and pads
each expert's run to a multiple of ``block`` rows, so a kernel program that
takes rows ``[b * block, (b + 1) * block)`` sees one expert only::

    ids = [[1, 0], [1, 2]], experts=3, block=2
    rows         = [1, 4,  0, 2,  3, 4,  4, 4, ...]     (4 = T*k: a padding row)
    block_expert = [0,     1,     2,     3, ...]         (3 = E: past the end, skip)

Sizes are static (``T*k + E*(block-1)`` rows at most), so the schedule is
built by a handful of device ops without reading anything back to the host;
``torch.compile`` and CUDA graphs see fixed shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    rows: torch.Tensor          # [capacity] int32: assignment index per padded row, T*k for padding
    block_expert: torch.Tensor  # [capacity // block] int32: expert per block, E past the last one
    block: int
    experts: int
    assignments: int            # T * k


def capacity(assignments: int, experts: int, block: int) -> int:
    """Rows needed in the worst case: every expert's run padded by up to ``block - 1``."""
    return -(-(assignments + experts * (block - 1)) // block) * block


def schedule(ids: torch.Tensor, experts: int, block: int) -> Schedule:
    """Sort ``ids [T, k]``'s assignments by expert, each expert's run padded to ``block`` rows."""
    flat = ids.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block - 1) // block * block
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
    expert_sorted = flat[order]
    rank = torch.arange(n, device=ids.device) - first[expert_sorted]
    cap = capacity(n, experts, block)
    rows = torch.full((cap,), n, dtype=torch.int32, device=ids.device)
    rows[(padded_end - padded)[expert_sorted] + rank] = order.to(torch.int32)
    starts = torch.arange(0, cap, block, device=ids.device)
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return Schedule(rows, block_expert, block, experts, n)
