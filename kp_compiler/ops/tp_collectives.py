"""``kp::tp_copy``, ``kp::tp_reduce`` and the sequence-parallel pair: a tensor-parallel linear's collectives as
ops on plain tensors.

``passes/tp_linears.py`` computes the linears that ``ColwiseParallel`` and
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

Sequence parallelism adds the pair that moves token shards (``dim``: the
token dimension, ``world``: the group's size):

- ``sp_all_gather(x, dim, world, group_name)``: forward the shards
  concatenated along ``dim``; backward the gradient summed over the group
  and scattered along ``dim``.
- ``sp_reduce_scatter(y, dim, world, group_name)``: forward the sum over the
  group, each rank keeping its share of ``dim``; backward the gradient's
  shards gathered.

A column-parallel linear whose output ``DTensor`` gathers whole (``ColwiseParallel(output_layouts=Replicate())``:
an LM head that every rank needs whole) adds:

- ``tp_all_gather(y, world, group_name)``: forward the ranks' column shards
  concatenated along the last dimension; backward this rank's columns of the
  gradient (the same on every rank), ``tp_local_columns``: no communication,
  what ``redistribute`` from ``Replicate`` to ``Shard(-1)`` does.

The collectives call torch's functional collectives (``_c10d_functional``), with the
group's registered name, so they run under any backend torch's collectives
run under (NCCL, gloo). Under Inductor the ops are decomposed into those collectives when AOTAutograd traces
the graph (``decompositions()``, end of this file), and into views for a group of one rank::

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


# Sequence parallelism: activations sharded over tokens (``Shard(1)``) between the blocks' linears.


def _gather(x: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    rows = c10d.wait_tensor(c10d.all_gather_into_tensor(x.movedim(dim, 0).contiguous(), world, group_name))
    return rows.movedim(0, dim).contiguous()


def _scatter(y: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    rows = c10d.wait_tensor(c10d.reduce_scatter_tensor(y.movedim(dim, 0).contiguous(), "sum", world, group_name))
    return rows.movedim(0, dim).contiguous()


def _resized(x: torch.Tensor, dim: int, size) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    return x.new_empty(shape)


@torch.library.custom_op("kp::sp_all_gather", mutates_args=())
def sp_all_gather(x: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    """``x``'s shards over the group, concatenated along ``dim`` in rank order; backward: the gradient summed
    over the group and scattered along ``dim`` (``redistribute`` from ``Shard(dim)`` to ``Replicate``)."""
    return _gather(x, dim, world, group_name)


@sp_all_gather.register_fake
def _(x, dim, world, group_name):
    return _resized(x, dim, x.shape[dim] * world)


@torch.library.custom_op("kp::sp_reduce_scatter", mutates_args=())
def sp_reduce_scatter(y: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    """``y`` summed over the group, each rank keeping its share of ``dim``; backward: the gradient's shards
    gathered (``redistribute`` from ``Partial`` to ``Shard(dim)``)."""
    return _scatter(y, dim, world, group_name)


@sp_reduce_scatter.register_fake
def _(y, dim, world, group_name):
    return _resized(y, dim, y.shape[dim] // world)


def _sp_setup(ctx, inputs, output):
    ctx.dim, ctx.world, ctx.group_name = inputs[1:]


def _gather_backward(ctx, grad):
    return sp_reduce_scatter(grad, ctx.dim, ctx.world, ctx.group_name), None, None, None


def _scatter_backward(ctx, grad):
    return sp_all_gather(grad, ctx.dim, ctx.world, ctx.group_name), None, None, None


sp_all_gather.register_autograd(_gather_backward, setup_context=_sp_setup)
sp_reduce_scatter.register_autograd(_scatter_backward, setup_context=_sp_setup)


# A column-parallel output gathered whole (``output_layouts=Replicate()``): the LM head of torchtitan's and the
# usual TP plans.


def _rank(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).rank()


@torch.library.custom_op("kp::tp_local_columns", mutates_args=())
def tp_local_columns(g: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """This rank's share of ``g``'s last dimension (``world`` equal shares in rank order), read at run time."""
    width = g.shape[-1] // world
    return g.narrow(-1, _rank(group_name) * width, width).clone(memory_format=torch.contiguous_format)


@tp_local_columns.register_fake
def _(g, world, group_name):
    return _resized(g, g.dim() - 1, g.shape[-1] // world)


@torch.library.custom_op("kp::tp_all_gather", mutates_args=())
def tp_all_gather(y: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """The ranks' column shards of ``y`` concatenated along the last dimension; backward: this rank's columns of
    the gradient (``tp_local_columns``)."""
    return _gather(y, y.dim() - 1, world, group_name)


@tp_all_gather.register_fake
def _(y, world, group_name):
    return _resized(y, y.dim() - 1, y.shape[-1] * world)


def _columns_setup(ctx, inputs, output):
    ctx.world, ctx.group_name = inputs[1:]


def _all_gather_backward(ctx, grad):
    return tp_local_columns(grad, ctx.world, ctx.group_name), None, None


tp_all_gather.register_autograd(_all_gather_backward, setup_context=_columns_setup)


# Under Inductor (``lowering/decompositions.py``) each op becomes what its forward computes, in ATen and torch's
# functional collectives, when AOTAutograd traces the graph (its backward still comes from the op's autograd
# formula, whose ops decompose the same way). Inductor then sees the collectives: no Python call per op at run
# time, a copy fused into the op that made its input, and collectives it may reorder. A group of one rank moves
# nothing: the op becomes the identity (a view), as DTensor skips a one-rank mesh.


def _world(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


def _same(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.alias.default(x)


def _tp_reduce_decomposed(y, group_name):
    return _same(y) if _world(group_name) == 1 else _all_reduce(y, group_name)


def _tp_copy_decomposed(x, group_name):
    return _same(x)


def _sp_all_gather_decomposed(x, dim, world, group_name):
    return _same(x) if world == 1 else _gather(x, dim, world, group_name)


def _sp_reduce_scatter_decomposed(y, dim, world, group_name):
    return _same(y) if world == 1 else _scatter(y, dim, world, group_name)


def _tp_all_gather_decomposed(y, world, group_name):
    return _same(y) if world == 1 else _gather(y, y.dim() - 1, world, group_name)


def _tp_local_columns_decomposed(g, world, group_name):
    if world == 1:
        return _same(g)
    width = g.shape[-1] // world
    return g.narrow(-1, _rank(group_name) * width, width)


def decompositions() -> dict:
    """``{op: its forward in ATen and functional collectives}`` for Inductor's decomposition table."""
    ops = torch.ops.kp
    return {ops.tp_reduce.default: _tp_reduce_decomposed, ops.tp_copy.default: _tp_copy_decomposed,
            ops.sp_all_gather.default: _sp_all_gather_decomposed,
            ops.sp_reduce_scatter.default: _sp_reduce_scatter_decomposed,
            ops.tp_all_gather.default: _tp_all_gather_decomposed,
            ops.tp_local_columns.default: _tp_local_columns_decomposed}
