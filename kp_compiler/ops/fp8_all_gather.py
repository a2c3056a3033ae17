"""FP8 all-gather under FSDP2: a weight's shards travel as FP8 bytes and are dequantized on arrival.

``FP8GatherWeight`` wraps a parameter's data. FSDP2 (``fully_shard``) keeps
the wrapper on each rank's shard and, because the shard has
``fsdp_pre_all_gather``/``fsdp_post_all_gather``, calls them around its
all-gather instead of sending the shard in ``param_dtype``:

    before (bf16 on the wire):  shard bf16 -> all_gather -> weight bf16
    after  (FP8 on the wire):   shard -> amax -> all_reduce(max) -> q = fp8(shard / scale) -> all_gather(q)
                                -> weight = (q * scale) in param_dtype

One tensorwise scale per weight (the amax all-reduced over the shard group,
one scalar), so every rank quantizes with the scale the ``fp8-linear`` pass
computes in the graph from the gathered weight. That pass then re-quantizes
the gathered weight and gets ``q`` back exactly (each ``q * scale`` is within
an ulp of ``param_dtype``, far inside half an FP8 step), so the GEMM is the
one it runs without this wrapper, on half the bytes all-gathered (a quarter
with fp32 parameters). The backward's gradient passes the cast straight
through, as the pass's own weight cast does.

The compiled graph never sees the wrapper: FSDP2 hands the module the
gathered plain tensor. Between all-gathers (the optimizer step, ``state_dict``,
``copy_``) the wrapper runs every op on the data it holds. ``gathered_in_fp8``
tells whether a tensor is a weight that arrived this way (the pass notes a
linear it keeps in ``param_dtype`` that computes with FP8-rounded values).

``precompute_amaxes`` takes every weight's amax in one all-reduce (after an
optimizer step) instead of one per weight and all-gather; ``Written`` counts
in-place writes, so an amax taken before the last write is never used.
Refused at the first all-gather: rows that do not split evenly over the
shard group, and weights tensor parallelism shards too. Pickling saves the
plain data, so checkpoints load without this class.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves, tree_map_only

from .fp8_quant import amax, quantize, scale_from_amax

aten = torch.ops.aten

# Results that view the parameter's data (FSDP2 shards and views it; DTensor aliases it): they keep the wrapper
# and share its ``Written``.
VIEWS = {aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default, aten.slice.Tensor,
         aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.narrow.default,
         aten.as_strided.default}
# Results that are the parameter's data again: its views, and the new tensors FSDP2 pads it into or
# ``model.to()`` moves it to (a ``Written`` of their own). Anything else returns plain tensors: arithmetic,
# reductions, and the ``zeros_like``/``clone`` an optimizer makes its state with (the optimizer's, not the
# parameter's). In-place ops return the wrapper they wrote.
STRUCTURAL = VIEWS | {aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default,
                      aten._to_copy.default}

# storage address -> the gathered tensor living there (FSDP2 frees and reallocates it each step)
_GATHERED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


class Written:
    """What the views of one weight's data share: how often it was written in place (counted here: under
    DTensor and FSDP2 an optimizer step bumps neither this tensor's nor its data's version counter), and the
    all-reduced amax ``precompute_amaxes`` took, with the count it is of."""

    def __init__(self):
        self.count = 0
        self.amax = None


class FP8GatherWeight(torch.Tensor):
    """A parameter's data (``_data``, plain) that FSDP2 all-gathers as ``fp8_dtype`` bytes plus one scale."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, fp8_dtype: torch.dtype, written: "Written | None" = None):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor, fp8_dtype: torch.dtype, written: "Written | None" = None):
        self._data = data
        self.fp8_dtype = fp8_dtype
        self.written = written if written is not None else Written()

    def __repr__(self):
        return f"FP8GatherWeight({self._data!r}, fp8_dtype={self.fp8_dtype})"

    def __reduce_ex__(self, protocol):
        # saved as the plain tensor it holds: checkpoints (torch.save, DCP) load without this class
        return self._data.__reduce_ex__(protocol)

    def __tensor_flatten__(self):
        return ["_data"], (self.fp8_dtype,)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return FP8GatherWeight(inner["_data"], *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrappers = [a for a in tree_leaves((args, kwargs)) if isinstance(a, FP8GatherWeight)]
        out = func(*tree_map_only(FP8GatherWeight, lambda t: t._data, args),
                   **tree_map_only(FP8GatherWeight, lambda t: t._data, kwargs))
        if func._schema.is_mutable:  # may have written any of them (an optimizer's foreach step: all)
            for w in wrappers:
                w.written.count += 1
            if isinstance(args[0], FP8GatherWeight):
                return args[0]  # in place: the wrapper's data changed
        if func not in STRUCTURAL:
            return out
        first = wrappers[0]
        written = first.written if func in VIEWS else None
        return tree_map_only(torch.Tensor, lambda t: FP8GatherWeight(t, first.fp8_dtype, written), out)

    # FSDP2's all-gather extension (torch.distributed.fsdp: fully_shard)
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        _check_layout(mesh, outer_size, module)
        data = self._data if mp_policy.param_dtype is None else self._data.to(mp_policy.param_dtype)
        casts = _casts(data)
        pre = self.written.amax
        if pre is not None and pre[1] == self.written.count:  # precomputed for this data, not written since
            m = pre[0].to(data.dtype).float()  # rounding is monotonic: amax(bf16(x)) = bf16(amax(x))
        else:
            m = casts.amax(data, False)
            if mesh.size() > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=mesh.get_group())
        q, scale = casts.quantize_from_amax(data, m, self.fp8_dtype)
        return (q.view(torch.uint8),), (scale,)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (data,), (scale,) = outputs, metadata
        q = data.view(self.fp8_dtype)
        if out is not None:  # FSDP2 re-gathers into the storage it freed (the backward's all-gather): the values
            # autograd saved in the forward come back. ``.data`` keeps the write off the parameter's version
            # counter, as FSDP2's own all-gather writes the storage without bumping it.
            _casts(q).dequantize(q, scale, out.data)
            _GATHERED[out.untyped_storage().data_ptr()] = out
            return None
        weight = _casts(q).dequantize(q, scale, torch.empty(q.shape, dtype=param_dtype, device=q.device))
        _GATHERED[weight.untyped_storage().data_ptr()] = weight
        return weight, (weight,)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(q.float() * scale)


def _quantize_from_amax(t: torch.Tensor, m: torch.Tensor, dtype: torch.dtype):
    scale = scale_from_amax(m, dtype)
    return quantize(t, scale, dtype), scale


EAGER = SimpleNamespace(amax=amax, quantize_from_amax=_quantize_from_amax, dequantize=_dequantize)


def _casts(t: torch.Tensor):
    """The Triton kernels of the CUDA FP8 path on CUDA (``ops/triton_fp8.py``: one read of the shard for the
    amax, one for the cast, which computes the scale too, one pass to dequantize); the ``fp8_quant`` functions
    elsewhere."""
    if not t.is_cuda:
        return EAGER
    from . import triton_fp8  # Triton is imported only where it runs

    return triton_fp8


@torch.no_grad()
def precompute_amaxes(weights: list, group=None) -> None:
    """The all-reduced amax of every weight in ``weights`` (``FP8GatherWeight``s) in one all-reduce (MAX over
    ``group``, every rank calling), kept with the count of in-place writes it is of (``Written``): FSDP2's
    all-gathers then use it instead of one all-reduce per weight, until the data is written again (an
    optimizer step), after which they take their own. MAX over ranks holding the same shard (HSDP's replicas)
    changes nothing."""
    if not weights:
        return
    amaxes = torch.stack([_casts(w._data).amax(w._data, False) for w in weights])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
    for w, m in zip(weights, amaxes):
        w.written.amax = (m, w.written.count)


def _check_layout(mesh, outer_size, module) -> None:
    """Refuse, at the first all-gather, the layouts this extension does not handle (a clear error instead of a
    wrong weight or a crash inside FSDP2 later): rows that do not split evenly over the shard group (FSDP2 would
    pad the shards, and re-pad them at its lazy init behind a ``state_dict`` taken before), and a weight that is
    also tensor-parallel (its gathered weight is a DTensor)."""
    if outer_size[0] % mesh.size():
        raise NotImplementedError(
            f"kp_compiler.fp8.all_gather_in_fp8: a weight of {outer_size[0]} rows does not split evenly over the "
            f"{mesh.size()} ranks of FSDP2's shard group; leave it out (all_gather_in_fp8's exclude, or its "
            "shard_group_size) or shard it evenly")
    weight = getattr(module, "weight", None)
    placements = tuple(getattr(weight, "placements", ()))  # a DTensor's (FSDP2's own sharding, and any other)
    if sum(p.is_shard() or type(p).__name__ == "_StridedShard" for p in placements) > 1:
        raise NotImplementedError(
            "kp_compiler.fp8.all_gather_in_fp8: this weight is also sharded by tensor parallelism "
            f"({placements}); FP8 all-gather covers weights FSDP2 alone shards: call all_gather_in_fp8 only on "
            "models without tensor parallelism")


def gathered_in_fp8(t) -> bool:
    """Whether ``t`` views a weight that FSDP2 all-gathered in FP8 (``FP8GatherWeight``)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return False
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake or functional tensors have no storage to compare
        return False
    return ptr != 0 and ptr in _GATHERED
