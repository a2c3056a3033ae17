"""Per-op rules of the row-independence proof (``rows.py``): how each op moves the batch axis, or why it breaks.

A rule takes the prover and the node and returns the result's batch axis (``FREE`` for none; a tuple for a
tuple result) or raises ``Broken``. Ops absent here and from ``rows.POINTWISE`` / ``rows.OVER_DIMS`` are not
proven.
"""

from __future__ import annotations

import sys
from typing import Callable

import sympy
import torch
from torch import fx

from .graph import val
from .row_axis import FREE, Broken, axis_of, expr_of, op_name

RULES: dict[str, Callable] = {}


def rule(*names: str):
    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn
    return register


def _ax(p, node, i=0):
    a = node.args[i] if i < len(node.args) else None
    return p.state.get(a) if a is not None and not isinstance(a, (int, float, bool)) else FREE


def _rank(node, i=0) -> int:
    return val(node.args[i]).dim()


def _need_free(p, node, *indices, what="weights"):
    for i in indices:
        if i < len(node.args) and _ax(p, node, i) is not FREE:
            raise Broken(node, f"its {what} (argument {i}) hold batch rows")


def _results(p, node):
    v = val(node)
    if isinstance(v, (tuple, list)):
        return tuple(axis_of(t, p.symbol, node) if isinstance(t, torch.Tensor) else FREE for t in v)
    return p.out_axis(node)


def _rows_through_features(p, node):
    """A linear map of the last dim: the input's batch axis carries over unless it is that dim."""
    a = _ax(p, node)
    if a is FREE:
        return FREE
    if a == _rank(node) - 1:
        raise Broken(node, "contracts over the batch axis")
    return p.out_axis(node)


@rule("linear")
def _linear(p, node):
    _need_free(p, node, 1, 2)
    return _rows_through_features(p, node)


@rule("multi_linear")
def _multi_linear(p, node):
    """``kp::multi_linear``: ``linear`` over several weights, outputs side by side along the last dim."""
    if any(p.state.get(w) is not FREE for w in node.args[1]):
        raise Broken(node, "its weights hold batch rows")
    return _rows_through_features(p, node)


@rule("mm", "addmm", "bmm", "baddbmm", "matmul")
def _matmul(p, node):
    name = op_name(node.target)
    i, j = (1, 2) if name in ("addmm", "baddbmm") else (0, 1)
    a, b = _ax(p, node, i), _ax(p, node, j)
    ra, rb = _rank(node, i), _rank(node, j)
    if a is not FREE and a == ra - 1:
        raise Broken(node, "contracts over the batch axis (the left operand's last dim)")
    if b is not FREE and (b == rb - 2 or rb == 1):
        raise Broken(node, "contracts over the batch axis (the right operand's rows)")
    if a is not FREE and b is not FREE and not (a < ra - 2 and b < rb - 2):
        raise Broken(node, "both operands hold batch rows outside their batch dims")
    if name in ("addmm", "baddbmm"):
        p.pointwise(node, [node.args[0]] if _ax(p, node, 0) is not FREE else [])
    return p.out_axis(node)


SDPA = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu")


@rule(*SDPA)
def _attention(p, node):
    axes = {_ax(p, node, i) for i in range(3)}
    if len(axes) != 1 or FREE in axes:
        raise Broken(node, "query, key and value do not share one batch axis")
    (a,) = axes
    if a >= _rank(node) - 2:
        raise Broken(node, "the batch axis is the sequence or head dim: attention would mix rows")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if mask is not None and p.state.get(mask) is not FREE:
        rank, m = _rank(node), val(mask)
        if rank - (m.dim() - p.state[mask]) != a:
            raise Broken(node, "the attention mask's batch axis is not the query's")
    return _results(p, node)


@rule("flex_attention")
def _flex_attention(p, node):
    """FlexAttention's op: rows apart when q, k and v hold the batch at dim 0 and nothing else does (the block
    mask, the mods' captured tensors), and neither mod reads the batch index ``b``."""
    if {_ax(p, node, i) for i in range(3)} != {0}:
        raise Broken(node, "query, key and value do not all hold the batch at dim 0")
    block_mask, others = node.args[4], [*node.args[7], *node.args[8]] if len(node.args) > 8 else []
    tables = [t for t in block_mask[:-1] if isinstance(t, fx.Node) and isinstance(val(t), torch.Tensor)]
    if any(isinstance(t, fx.Node) and p.state.get(t) is not FREE for t in [*tables, *others]):
        raise Broken(node, "its block mask or a tensor its score_mod / mask_mod reads holds batch rows")
    if any(val(t).dim() > 0 and val(t).shape[0] != 1 for t in tables):  # the lengths in the tuple: SymInts
        raise Broken(node, "its block mask has a table per batch element (not one broadcast over the batch)")
    gm = node.graph.owning_module
    for mod, b_index, what in ((node.args[3], 1, "score_mod"), (block_mask[-1], 0, "mask_mod")):
        if not isinstance(mod, fx.Node) or mod.op != "get_attr":
            raise Broken(node, f"its {what} is not a graph the proof can read")
        placeholders = [n for n in getattr(gm, mod.target).graph.nodes if n.op == "placeholder"]
        if len(placeholders) <= b_index or placeholders[b_index].users:
            raise Broken(node, f"its {what} reads the batch index b")
    return _results(p, node)


@rule("embedding")
def _embedding(p, node):
    _need_free(p, node, 0, what="table")
    return p.out_axis(node)


@rule("index")
def _index(p, node):
    src, indices = node.args[0], node.args[1]
    a = p.state.get(src)
    if a is FREE:  # rows of a table picked by batched indices (an embedding)
        return p.out_axis(node)
    if a < len(indices) and indices[a] is not None:
        raise Broken(node, "indexes along the batch axis")
    if any(i is not None and p.state.get(i) is not FREE for i in indices):
        raise Broken(node, "indexes a batched tensor with batched indices")
    return p.out_axis(node)


@rule("index_select")
def _index_select(p, node):
    a, dim = _ax(p, node), node.args[1] % max(_rank(node), 1)
    if a is not FREE and (dim == a or _ax(p, node, 2) is not FREE):
        raise Broken(node, "selects along the batch axis")
    return p.out_axis(node)


@rule("gather")
def _gather(p, node):
    a, dim, idx = _ax(p, node), node.args[1] % _rank(node), _ax(p, node, 2)
    if dim == a or (a is not FREE and idx is not FREE and a != idx):
        raise Broken(node, "gathers along the batch axis")
    if a is not FREE and idx is FREE:
        raise Broken(node, "gathers batch rows with an index that holds none (rows picked for every row)")
    return p.out_axis(node)


# pure relabelings of dims: the batch dim (the one dim whose size holds the symbol) moves, its rows do not mix
@rule("permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "expand_as", "alias", "movedim",
      "one_hot", "numpy_T", "contiguous", "clone", "detach")
def _relabel(p, node):
    return p.out_axis(node)


@rule("view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten", "_reshape_alias", "view_as",
      "reshape_as")
def _reshape(p, node):
    """The batch axis survives a reshape when the dims before it keep one product and it stays the outer
    factor of its dim (``[B, S, d] -> [B*S, d] -> [B, S, d]``)."""
    a = _ax(p, node)
    if a is FREE:
        if p.out_axis(node) is not FREE:  # [16] -> [B, 16 / B]: what a row holds would depend on B
            raise Broken(node, "reshapes a tensor without batch rows by the batch size")
        return FREE
    src, out = val(node.args[0]), val(node)
    b = axis_of(out, p.symbol, node)
    if b is FREE:
        raise Broken(node, "the batch dim disappears in the reshape")
    before = sympy.simplify(sympy.Mul(*[expr_of(s) for s in src.shape[:a]]) - sympy.Mul(*[expr_of(s) for s in out.shape[:b]]))
    if before != 0:
        raise Broken(node, "the reshape moves the batch dim inside another dim (rows would interleave)")
    return b


@rule("select")
def _select(p, node):
    if _ax(p, node) is not FREE and node.args[1] % _rank(node) == _ax(p, node):
        raise Broken(node, "selects one row of the batch")
    return p.out_axis(node)


@rule("slice", "narrow")
def _slice(p, node):
    a = _ax(p, node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % max(_rank(node), 1)
    if a is FREE or dim != a:
        return p.out_axis(node)
    src = val(node.args[0])
    if op_name(node.target) == "slice":
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        whole = end is None or (isinstance(end, int) and end >= sys.maxsize // 2)
        if end is not None and not whole:
            end_v = val(end) if hasattr(end, "meta") else end
            whole = sympy.simplify(expr_of(end_v) - expr_of(src.shape[a])) == 0 if end_v is not None else False
        if start in (None, 0) and step == 1 and whole:
            return a
    raise Broken(node, "slices the batch axis")


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(p, node):
    a = _ax(p, node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if op_name(node.target) == "unbind":
        dim = node.args[1] if len(node.args) > 1 else 0
    if a is not FREE and dim % _rank(node) == a:
        raise Broken(node, "splits the batch axis")
    return _results(p, node)


@rule("cat", "stack")
def _cat(p, node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    axes = {p.state.get(t) for t in tensors} - {FREE}
    if len(axes) > 1:
        raise Broken(node, "joins tensors whose batch axes differ")
    rank = val(node).dim()  # not the first input's: cat skips empty 1-D tensors (transformers' cache starts so)
    if axes and op_name(node.target) == "cat" and dim % rank == next(iter(axes)):
        raise Broken(node, "concatenates along the batch axis")
    return p.out_axis(node)


@rule("repeat")
def _repeat(p, node):
    a = _ax(p, node)
    if a is not FREE:
        sizes = list(node.args[1])
        lead = len(sizes) - _rank(node)
        if sizes[a + lead] != 1:
            raise Broken(node, "repeats the batch axis")
    return p.out_axis(node)


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(p, node):
    a, normalized = _ax(p, node), node.args[1]
    if a is not FREE and a >= _rank(node) - len(normalized):
        raise Broken(node, "normalises over the batch axis")
    _need_free(p, node, 2, 3)
    return _results(p, node)


@rule("group_norm", "native_group_norm")
def _group_norm(p, node):
    if _ax(p, node) not in (FREE, 0):
        raise Broken(node, "group norm's statistics are per sample of dim 0, not of the batch axis")
    return _results(p, node)


@rule("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm",
      "_native_batch_norm_legit_functional", "_batch_norm_with_update")
def _batch_norm(p, node):
    name = op_name(node.target)
    training = {"batch_norm": 5, "native_batch_norm": 5, "_native_batch_norm_legit": 5, "cudnn_batch_norm": 5,
                "_native_batch_norm_legit_functional": 5}.get(name)
    if name == "_batch_norm_with_update" or (training is not None and len(node.args) > training
                                             and node.args[training]):
        raise Broken(node, "BatchNorm in training: statistics over the batch, running stats updated")
    if _ax(p, node) not in (FREE, 0):
        raise Broken(node, "BatchNorm's channel dim is not after the batch axis")
    return _results(p, node)


@rule("_native_batch_norm_legit_no_training")
def _batch_norm_eval(p, node):
    if _ax(p, node) not in (FREE, 0):
        raise Broken(node, "BatchNorm's channel dim is not after the batch axis")
    return _results(p, node)


@rule("convolution", "conv1d", "conv2d", "conv3d")
def _conv(p, node):
    _need_free(p, node, 1, 2)
    if _ax(p, node) not in (FREE, 0):
        raise Broken(node, "convolves along the batch axis")
    return p.out_axis(node)


@rule("routed_experts", "routed_experts_biased")
def _routed_experts(p, node):
    """``kp::routed_experts``: each token's output from its own row, ids and routing weights."""
    if {_ax(p, node, i) for i in range(3)} != {0}:
        raise Broken(node, "tokens, expert ids and routing weights do not share batch axis 0")
    for ws in node.args[3:-1]:
        if any(p.state.get(w) is not FREE for w in ws):
            raise Broken(node, "expert weights hold batch rows")
    return 0


@rule(*("zeros", "ones", "empty", "new_zeros", "new_ones", "new_empty", "zeros_like", "ones_like", "empty_like",
        "empty_strided", "scalar_tensor"))
def _factory(p, node):
    """Every row the same (or uninitialised, for ``empty``): the size may come from the batch size."""
    return p.out_axis(node)


@rule("full", "new_full", "full_like")
def _full(p, node):
    """The fill value is checked with every op's scalars (``rows._Prover.check_scalar_args``)."""
    return p.out_axis(node)


@rule("arange")
def _arange(p, node):
    """``arange(n)`` holds ``i`` at row ``i`` whatever ``n``; a start or step from the batch size does not."""
    return p.out_axis(node)  # a start or step from the batch size is refused with every op's scalars


@rule("copy_", "copy")
def _copy(p, node):
    dst, src = node.args[0], node.args[1]
    if p.state.get(src) is not FREE and p.state.get(dst) is FREE:
        raise Broken(node, "writes batch rows into a tensor without a batch axis")
    return p.state.get(dst) if p.state.get(dst) is not FREE else p.out_axis(node)
