"""Run a worker on ``world`` CPU processes and load what each rank saved (``{folder}/rank{r}.pt``)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(main, world: int, folder: str, *args, timeout_s: float = 600) -> list:
    """``main(rank, world, folder, *args)`` on ``world`` processes; a hung collective fails the test instead of
    hanging CI."""
    procs = mp.spawn(main, args=(world, folder, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the {world} gloo processes did not finish within {timeout_s:.0f} s")
    return [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(world)]
