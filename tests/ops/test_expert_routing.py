"""``expert_routing.schedule``: every assignment once, in its expert's padded block, no block mixes experts."""

import pytest
import torch

from kp_compiler.ops.expert_routing import capacity, schedule


@pytest.mark.parametrize("T,k,E,block", [(10, 2, 4, 2), (64, 8, 64, 16), (37, 3, 5, 8), (5, 1, 8, 4)])
def test_schedule_covers_every_assignment_once_in_its_experts_block(T, k, E, block):
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    plan = schedule(ids, E, block)
    n = T * k
    assert plan.rows.numel() == capacity(n, E, block) and plan.rows.numel() % block == 0
    real = plan.rows[plan.rows < n].long()
    assert sorted(real.tolist()) == list(range(n))  # each assignment exactly once
    row_expert = plan.block_expert.long().repeat_interleave(block)
    flat = ids.reshape(-1)
    keep = plan.rows < n
    assert torch.equal(row_expert[keep], flat[plan.rows[keep].long()])  # a row's block is its expert's
    used = plan.block_expert < E
    assert torch.all(plan.block_expert[used][1:] >= plan.block_expert[used][:-1])  # sorted by expert
    assert torch.all(plan.rows.view(-1, block)[~used] == n)  # blocks past the end hold padding only


def test_an_idle_expert_gets_no_block():
    ids = torch.tensor([[0, 2], [2, 0]])
    plan = schedule(ids, 3, 2)
    assert 1 not in plan.block_expert.tolist()
    assert plan.block_expert.tolist()[:2] == [0, 2]


@pytest.mark.parametrize("T,k,E,block", [(10, 2, 4, 2), (64, 8, 64, 16), (37, 3, 5, 8), (300, 2, 8, 128), (1, 1, 3, 16)])
def test_the_triton_schedule_is_the_aten_schedule_bit_for_bit(T, k, E, block):
    """One launch (the CUDA path) against the ATen reference; runs under TRITON_INTERPRET=1 here."""
    from kp_compiler.ops import triton_routing

    g = torch.Generator().manual_seed(T + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2] = ids[: T // 2] % 2  # skewed: most assignments on experts 0 and 1, some experts idle
    want, got = schedule(ids, E, block), triton_routing.schedule(ids, E, block)
    assert torch.equal(got.rows, want.rows)
    assert torch.equal(got.block_expert, want.block_expert)


@pytest.mark.parametrize("T,k,E", [(10, 2, 4), (64, 8, 64), (37, 3, 5), (1, 1, 3)])
def test_sort_by_expert_is_a_stable_argsort_and_the_counts_scan(T, k, E):
    """The backward's sort (one launch, a block of one row) against ``argsort(stable=True)`` and a cumsum."""
    from kp_compiler.ops import triton_routing

    g = torch.Generator().manual_seed(T * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2] = ids[: T // 2] % 2  # skewed, some experts idle
    order, ends = triton_routing.sort_by_expert(ids, E)
    assert order.dtype == ends.dtype == torch.int32
    assert torch.equal(order.long(), torch.argsort(ids.flatten(), stable=True))
    assert torch.equal(ends.long(), torch.cumsum(torch.bincount(ids.flatten(), minlength=E), 0))


@pytest.mark.parametrize("T,k,E,block", [(10, 2, 4, 16), (64, 8, 64, 16), (37, 3, 5, 4)])
def test_shifts_map_padded_rows_to_the_sorted_order(T, k, E, block):
    """Each valid padded row ``r`` of expert ``e`` is row ``r - shifts[e]`` of the stable sort by expert."""
    from kp_compiler.ops import triton_routing

    g = torch.Generator().manual_seed(T + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2] = ids[: T // 2] % 2
    plan, shifts = triton_routing.schedule_with_shifts(ids, E, block)
    order = torch.argsort(ids.flatten(), stable=True)
    rows, n = plan.rows.long(), T * k
    valid = rows < n
    expert = plan.block_expert.long().repeat_interleave(block)[: rows.numel()]
    sorted_row = torch.arange(rows.numel())[valid] - shifts.long()[expert[valid]]
    assert torch.equal(order[sorted_row], rows[valid])  # every assignment lands on its sorted position
    assert torch.equal(torch.sort(sorted_row).values, torch.arange(n))  # once each
