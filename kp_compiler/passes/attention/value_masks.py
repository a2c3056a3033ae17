"""Masks that read no input, recognised by their value as causal, sliding-window or chunked.

``mask_mod.py`` lifts masks it can read op by op. Some masks are built from
positions the model makes itself, through ops no ``mask_mod`` spells:
transformers 5.24, with no cache (a training step), detects packed sequences
from its own ``arange`` positions (``diff`` and ``cumsum`` over them), then
gathers those document ids and positions by query and key index. Such a mask
reads no graph input, so its value at these (static) lengths is a fact:
``recognise(keep, L, S)`` runs the subgraph once (``subgraph.py``), requires
the same ``L x S`` grid for every batch and head, and compares it on the whole
grid with each structured mask below, whose one parameter (window, chunk) is
read off the grid first. Only an exact match is returned; anything else
(another pattern, a mask that reads data, symbolic lengths) gives None.

Before (transformers' packed-sequence causal mask, positions from ``arange``)::

    %position_diff = aten.diff.default(%expand, -1, ..., %sub)
    %cumsum = aten.cumsum.default(aten.ne.Scalar(%position_diff, 1), -1)      # document ids
    %index = aten.index.Tensor(%expand, [%batch, %q])                         # positions by query
    %and = aten.bitwise_and.Tensor(aten.le.Tensor(...), aten.eq.Tensor(...))  # b8[2, 1, 32, 32]

After::

    mask_mod = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx        # proven on the 32 x 32 grid
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import fx

from .subgraph import evaluate


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def sliding_window(window: int) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return mask_mod


def chunked(chunk: int) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx // chunk == kv_idx // chunk)
    return mask_mod


def _grid(keep: fx.Node, L: int, S: int) -> Optional[torch.Tensor]:
    """The mask's ``L x S`` value, if it is the same for every leading (batch, head) index."""
    dense = evaluate(keep)
    if dense is None or dense.dtype != torch.bool or dense.dim() < 2:
        return None
    try:
        dense = dense.expand(*dense.shape[:-2], L, S).reshape(-1, L, S)
    except RuntimeError:  # does not broadcast to the scores' grid
        return None
    first = dense[0]
    return first if bool((dense == first).all()) else None


def _candidates(grid: torch.Tensor) -> list[Callable]:
    L, S = grid.shape
    out = [causal]
    window = int(grid.sum(-1).max())
    if 0 < window < S:
        out.append(sliding_window(window))
    column = grid[1:, 0].logical_not().nonzero()  # first query row that no longer sees key 0
    if len(column):
        out.append(chunked(int(column[0]) + 1))
    return out


def recognise(keep: fx.Node, L, S) -> Optional[Callable]:
    """A structured ``mask_mod`` equal to ``keep`` on the whole static ``L x S`` grid, or None."""
    if not (isinstance(L, int) and isinstance(S, int)) or not isinstance(keep, fx.Node):
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        grid = _grid(keep, L, S)
        if grid is None:
            return None
        q_idx = torch.arange(L, device=grid.device)[:, None]
        kv_idx = torch.arange(S, device=grid.device)[None, :]
        for mask_mod in _candidates(grid):
            if torch.equal(torch.as_tensor(mask_mod(None, None, q_idx, kv_idx)).expand(L, S), grid):
                return mask_mod
    return None
