"""``kp::tp_copy`` and ``kp::tp_reduce``: a tensor-parallel linear's collectives as ops on plain tensors.

``core/tp_linears.py`` computes the linears that ``ColwiseParallel`` and
``RowwiseParallel`` shard on their local shards, outside ``DTensor``, so the
passes see ordinary ``linear`` nodes. What ``DTensor`` did around them
becomes one of these ops (Megatron's pair of conjugate operators):

- ``tp_copy(x, group_name)``: the input of column-parallel linears, the same
  on every rank. Forward: ``x`` (a copy; an op may not return its input).
  Backward: the sum of the gradient over the group (each rank's gradient
  covers its own output columns only), what ``DTensor.from_local(x,
  [Replicate()])`` does when its ``Partial`` gradient comes back.
- ``tp_reduce(y, group_name)``: the output of a row-parallel linear, a
  partial sum on each rank. Forward: the sum over the group (``redistribute``
  from ``Partial`` to ``Replicate``). Backward: the gradient as it is (it is
  the same on every rank).

Both call torch's functional collectives (``_c10d_functional``), with the
group's registered name, so they run under any backend torch's collectives
run under (NCCL, gloo)::

    %x_tp = kp.tp_copy.default(%ln_out, '0')
    %linear = aten.linear.default(%x_tp, %w_q, %b_q)           # local: this rank's heads
    %partial = aten.linear.default(%attn_out, %w_proj)         # local: this rank's share of the sum
    %reduced = kp.tp_reduce.default(%partial, '0')
"""

from __future__ import annotations

import torch


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group_name))


@torch.library.custom_op("kp::tp_reduce", mutates_args=())
def tp_reduce(y: torch.Tensor, group_name: str) -> torch.Tensor:
    return _all_reduce(y, group_name)


@tp_reduce.register_fake
def _(y, group_name):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _reduce_backward(ctx, grad):
    return grad, None


tp_reduce.register_autograd(_reduce_backward)


@torch.library.custom_op("kp::tp_copy", mutates_args=())
def tp_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.clone()


@tp_copy.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _copy_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _copy_backward(ctx, grad):
    return tp_reduce(grad, ctx.group_name), None


tp_copy.register_autograd(_copy_backward, setup_context=_copy_setup)
