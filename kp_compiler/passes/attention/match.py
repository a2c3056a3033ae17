"""``attention-to-sdpa``: plain-PyTorch attention onto ``scaled_dot_product_attention``.

Matches, around every ``softmax`` over the last dim::

    scores = matmul(q', k'^T)                # matmul or bmm; k'^T a transpose of k or any tensor
    scores = scores * c | scores / c         # any number of scalar scalings (also on q' or k')
    scores = scores.float()                  # optional upcast (anywhere before the softmax)
    scores = scores + bias                   # optional additive float mask (at most one)
    scores = scores.masked_fill(~keep, -inf) # optional boolean mask (at most one)
    p = softmax(scores, -1)[.to(dtype)]      # optional cast back
    p = dropout(p, prob, train)              # optional
    out = matmul(p, v)

Views that regroup static batch dims ([B*H, L, S] <-> [B, H, L, S]) may sit in
the chain (MBart adds its mask in the 4-D view of 3-D scores); SDPA then runs
on q, k, v viewed the same way and the result is viewed back.

Emits ``aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
is_causal, scale=c)``; ``is_causal=True`` (and no mask) when the boolean mask
is proven causal (``attention_masks.is_causal_keep_mask``), else the mask
tensor (bias and boolean mask combined into one float mask if both).

Preconditions (else the graph is left as it is): every intermediate (scores,
probabilities) has exactly one user, so attention weights that are returned
or reused elsewhere block the rewrite; scalings come before any mask or bias
(``(s + bias) * c`` would scale the bias too); the mask fill is ``-inf`` or
at most -1e4 (``finfo.min``: then passed as an additive mask, so even fully
masked rows match eager);
q, k, v, and the output share one floating dtype; q, k, v have the same rank
(3 or 4) and provably equal batch dims.

Before::

    %matmul = aten.matmul.default(%q, %transpose) : f32[1, 2, 8, 8]
    %div = aten.div.Tensor(%matmul, 2.0) : f32[1, 2, 8, 8]
    %masked_fill = aten.masked_fill.Scalar(%div, %bitwise_not, -inf) : f32[1, 2, 8, 8]
    %softmax = aten.softmax.int(%masked_fill, -1) : f32[1, 2, 8, 8]
    %matmul_1 = aten.matmul.default(%softmax, %v) : f32[1, 2, 8, 4]

After::

    %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, is_causal=True, scale=0.5) : f32[1, 2, 8, 4]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...core.graph import alive, val
from ...core.rules import Matches, erase_unused
from .layout import gqa_source, regroup, untranspose
from .sdpa_mask import note, sdpa_mask, tag
from .site import Attention
from .mask_mod import memoized

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)
SCALES = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)
MULS = (aten.mul.Tensor, aten.mul.Scalar)
FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _cast_dtype(node: fx.Node):
    """The floating dtype a pure cast converts to (None if ``node`` is not one).

    Casts to integer or bool dtypes truncate: they are never looked through.
    """
    dtype = None
    if node.target is aten.to.dtype:
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    elif node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}:
        dtype = node.kwargs.get("dtype")
    elif node.target is aten.type_as.default and isinstance(val(node.args[1]), torch.Tensor):
        dtype = val(node.args[1]).dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _const_scalar(arg) -> Optional[float]:
    """A Python number, or the value of a 0-dim ``full([], c)`` / ``scalar_tensor(c)`` / tensor-constant node."""
    if _number(arg):
        return arg
    if not isinstance(arg, fx.Node) or arg.op != "call_function":
        return None
    if arg.target is aten.full.default and list(arg.args[0]) == [] and _number(arg.args[1]):
        return arg.args[1]
    if arg.target is aten.scalar_tensor.default and _number(arg.args[0]):
        return arg.args[0]
    if arg.target is aten.zeros.default and list(arg.args[0]) == []:
        return 0
    return _tensor_constant(arg)


def _tensor_constant(arg) -> Optional[float]:
    """The value of a one-element tensor constant, ``detach_(lift_fresh_copy(_tensor_constant0))``
    (how Dynamo records ``torch.tensor(0.0)`` written in model code, e.g. transformers 5.17's masks)."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (
            aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default, aten.clone.default):
        arg = arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = getattr(arg.graph.owning_module, arg.target, None)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() != 0:
        return None
    return value.item()


def _sym_sqrt_of(arg) -> Optional[fx.Node]:
    """The SymInt node ``e`` when ``arg`` is ``sqrt(float(e))`` (``math.sqrt(q.size(-1))`` traced)."""
    if not isinstance(arg, fx.Node) or getattr(arg.target, "__name__", "") != "_sym_sqrt":
        return None
    inner = arg.args[0]
    if not isinstance(inner, fx.Node) or getattr(inner.target, "__name__", "") != "sym_float":
        return None
    e = inner.args[0]
    return e if isinstance(e, fx.Node) and isinstance(val(e), torch.SymInt) else None


def _bias_as_keep(bias: fx.Node):
    """(keep or ("not", masked_out), fill) when ``bias`` is 0 where kept and a -1e4-or-lower fill elsewhere."""
    while isinstance(bias, fx.Node) and bias.target in CASTS and _cast_dtype(bias) is not None:
        bias = bias.args[0]
    if not isinstance(bias, fx.Node) or bias.op != "call_function":
        return None
    if bias.target in (aten.where.self, aten.where.ScalarOther):
        cond, a, b = bias.args[:3]
        a, b = _const_scalar(a), _const_scalar(b)
        if a == 0 and _is_mask_fill(b):
            return cond, b
        if b == 0 and _is_mask_fill(a):
            return ("not", cond), a
        return None
    if bias.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _all_zeros(bias.args[0]):
        fill = _const_scalar(bias.args[2])
        return (("not", bias.args[1]), fill) if _is_mask_fill(fill) else None
    return None


def _is_mask_fill(x) -> bool:
    return _number(x) and (x == -math.inf or x <= -1e4)


def _all_zeros(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    return node.target in (aten.full.default, aten.full_like.default) and node.args[1] == 0


def _fill_parts(node: fx.Node):
    """(scores, not_keep or ("keep", keep), fill) for masked_fill / where, else None."""
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        fill = _const_scalar(node.args[2])
        return None if fill is None else (node.args[0], node.args[1], fill)
    if node.target in (aten.where.self, aten.where.ScalarOther):
        fill = _const_scalar(node.args[2])
        return None if fill is None else (node.args[1], ("keep", node.args[0]), fill)
    return None


def _forward(softmax: fx.Node, att: Attention) -> bool:
    """From the softmax down to ``matmul(p, v)``; every step single-user."""
    cur = softmax
    while True:
        user = _single_user(cur)
        if user is None or user.op != "call_function":
            return False
        if user.target in CASTS and _cast_dtype(user) is not None:
            att.removed.append(user)
            cur = user
            continue
        if user.target is aten.dropout.default:
            p, train = user.args[1], user.args[2]
            att.dropout_p = float(p) if train else 0.0
            att.removed.append(user)
            cur = user
            continue
        if user.target in MATMUL and user.args[0] is cur and user.args[1] is not cur:
            att.v, att.out = user.args[1], user
            return True
        operands = _einsum_operands(user, "pv")
        if operands is not None and operands[0] is cur and operands[1] is not cur:
            att.v, att.out = operands[1], user
            return True
        return False


def _backward(scores: fx.Node, att: Attention) -> bool:
    """From the softmax input up to ``matmul(q, k^T)``: masks first, then scalings."""
    cur, phase = scores, "mask"
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function" or len(_value_users(cur)) != 1:
            return False
        t = cur.target
        if t in CASTS and _cast_dtype(cur) is not None:
            nxt = cur.args[0]
        elif t in FILLS and phase == "mask" and att.keep_mask is None and _fill_parts(cur) is not None:
            nxt, not_keep, att.fill = _fill_parts(cur)
            att.fill_then_bias = att.bias is not None
            if not (att.fill == -math.inf or att.fill <= -1e4):
                return False
            att.keep_mask = not_keep[1] if isinstance(not_keep, tuple) else _invert(not_keep)
            att.keep_mask = _unbroadcast(att.keep_mask)
            att.space = _space(att, cur)
        elif t in (aten.view.default, aten.reshape.default) and _regroups_batch(cur):
            nxt = cur.args[0]  # e.g. [B*H, L, S] <-> [B, H, L, S] around the mask (MBart)
        elif t is aten.add.Tensor and phase == "mask" and att.bias is None and len(cur.args) == 2:
            a, b = cur.args
            if cur.kwargs.get("alpha", 1) != 1:
                return False
            nxt, att.bias = (a, b) if _reaches_matmul(a) else (b, a)
            if not isinstance(att.bias, fx.Node):
                return False
            att.space = _space(att, cur)
            if att.space is False:
                return False
        elif t in (aten.div.Tensor, aten.div.Scalar) and att.sqrt_head_dim is None and _sym_sqrt_of(cur.args[1]):
            phase = "scale"  # / sqrt(E) with a symbolic E: SDPA's default scale, checked in _shapes_ok
            att.sqrt_head_dim = _sym_sqrt_of(cur.args[1])
            nxt = cur.args[0]
        elif t in SCALES and _const_scalar(cur.args[1]) not in (None, 0):
            phase = "scale"
            c = _const_scalar(cur.args[1])
            att.scale *= c if t in MULS else 1.0 / c
            nxt = cur.args[0]
        elif t in MATMUL:
            att.q, att.k_t = _peel_scale(cur.args[0], att), _peel_scale(cur.args[1], att)
            att.removed.append(cur)
            return True
        elif _einsum_operands(cur, "qk") is not None:
            q, k = _einsum_operands(cur, "qk")
            att.q, att.k = _peel_scale(q, att), _peel_scale(k, att)
            att.removed.append(cur)
            return True
        else:
            return False
        att.removed.append(cur)
        cur = nxt


def _einsum_operands(node: fx.Node, kind: str):
    """(a, b) for a two-operand einsum that is ``q k^T`` (kind "qk") or ``p v`` (kind "pv")."""
    if node.op != "call_function" or node.target is not aten.einsum.default:
        return None
    equation, operands = node.args[0], node.args[1]
    if len(operands) != 2 or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").replace("...", "@").split("->")
    a, b = lhs.split(",") if lhs.count(",") == 1 else ("", "")
    if len({len(a), len(b), len(out)}) != 1 or len(a) < 3 or len(set(a)) != len(a):
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    i, x = a[-2:]
    y, z = b[-2:]
    if kind == "qk":  # "...id,...jd->...ij"
        ok = x == z and y != i and out[-2:] == i + y and len({i, x, y}) == 3
    else:  # "...ij,...je->...ie"
        ok = x == y and z not in (i, x) and out[-2:] == i + z and i != x
    return tuple(operands) if ok else None


def _value_users(node: fx.Node) -> list:
    """Users that read ``node``'s values (``expand_as(mask, node)`` reads only its shape)."""
    return [u for u in node.users if not (u.target is aten.expand_as.default and u.args[1] is node
                                          and u.args[0] is not node)]


def _unbroadcast(mask):
    """Drop ``expand_as``/``expand`` around a mask: SDPA broadcasts ``attn_mask`` itself."""
    if isinstance(mask, tuple):
        return (mask[0], _unbroadcast(mask[1]))
    while isinstance(mask, fx.Node) and mask.target in (aten.expand_as.default, aten.expand.default):
        mask = mask.args[0]
    return mask


def _regroups_batch(node: fx.Node) -> bool:
    """A view that only regroups static leading dims, keeping the last two."""
    out, inp = val(node), val(node.args[0])
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or min(out.dim(), inp.dim()) < 2:
        return False
    static = all(isinstance(d, int) for d in (*out.shape[:-2], *inp.shape[:-2]))
    return static and all(statically_known_true(a == b) for a, b in zip(out.shape[-2:], inp.shape[-2:]))


def _space(att: Attention, node: fx.Node):
    """The scores' shape at ``node``; a second mask/bias in another space is refused (False)."""
    shape = tuple(val(node).shape)
    if att.space is not None and len(att.space) != len(shape):
        return False
    return shape


def _reaches_matmul(node, depth: int = 8) -> bool:
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if node.target in MATMUL or _einsum_operands(node, "qk") is not None:
            return True
        if node.target in FILLS and _fill_parts(node) is not None:
            node = _fill_parts(node)[0]
            continue
        if node.target not in CASTS + SCALES + (aten.view.default, aten.reshape.default):
            return False
        node = node.args[0]
    return False


def _peel_scale(node, att: Attention):
    while isinstance(node, fx.Node) and node.target in SCALES and _const_scalar(node.args[1]) not in (None, 0):
        c = _const_scalar(node.args[1])
        att.scale *= c if node.target in MULS else 1.0 / c
        node = node.args[0]
    return node


def _invert(not_keep):
    """The keep mask for ``masked_fill(s, not_keep, -inf)``: peel a ``~``, else mark for inversion."""
    if isinstance(not_keep, fx.Node) and not_keep.target in (aten.bitwise_not.default, aten.logical_not.default):
        return not_keep.args[0]
    return ("not", not_keep)


def match(softmax: fx.Node) -> Optional[Attention]:
    """The attention around ``softmax``, or None if any precondition fails."""
    x, dim = softmax.args[0], softmax.args[1]
    vx = val(x)
    if not isinstance(vx, torch.Tensor) or dim % vx.dim() != vx.dim() - 1:
        return None
    att = Attention(q=None, k_t=None, v=None, out=None, removed=[softmax])
    if not _forward(softmax, att) or not _backward(x, att):
        return None
    if att.bias is not None and att.keep_mask is None and _bias_as_keep(att.bias) is not None:
        # transformers adds where(keep, 0, finfo.min): a boolean mask with a finite fill.
        keep, att.fill = _bias_as_keep(att.bias)
        att.keep_mask, att.bias = _unbroadcast(keep), None
    return att if _shapes_ok(att) else None


def _k_shape(att: Attention):
    """k's shape as [..., S, E], whichever spelling matched."""
    if att.k is not None:
        return val(att.k).shape
    kt = val(att.k_t).shape
    return (*kt[:-2], kt[-1], kt[-2])


def _shapes_ok(att: Attention) -> bool:
    key = att.k if att.k is not None else att.k_t
    q, k, v, out = (val(n) for n in (att.q, key, att.v, att.out))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, out)):
        return False
    if q.dim() not in (3, 4) or not (q.dim() == k.dim() == v.dim() == out.dim()):
        return False
    if not (q.dtype == k.dtype == v.dtype == out.dtype) or not q.is_floating_point():
        return False
    k_shape = _k_shape(att)
    batch_ok = all(statically_known_true(a == b) for t in (k_shape, v.shape)
                   for a, b in zip(q.shape[:-2], t[:-2]))
    if att.space is not None and len(att.space) != q.dim():
        if att.space is False or not all(isinstance(d, int) for d in (*att.space[:-2], *q.shape[:-2])):
            return False
    if att.sqrt_head_dim is not None:
        # Only "/ sqrt(E)" alone is SDPA's default scale; with other factors it is a symbolic product.
        if att.scale != 1.0 or not statically_known_true(val(att.sqrt_head_dim) == q.shape[-1]):
            return False
    return batch_ok and statically_known_true(q.shape[-1] == k_shape[-1])


def _rewrite(gm: fx.GraphModule, att: Attention) -> str:
    g = gm.graph
    q_val = val(att.q)
    L, S = q_val.shape[-2], _k_shape(att)[-2]
    with g.inserting_before(att.out):
        k = att.k if att.k is not None else untranspose(g, att.k_t)
        v = att.v
        mask, causal = sdpa_mask(g, att, L, S, q_val.dtype)
        scale = None if att.sqrt_head_dim is not None else att.scale  # None: SDPA's 1/sqrt(E)
        kwargs = {"attn_mask": mask, "dropout_p": att.dropout_p, "is_causal": causal, "scale": scale}
        k0, v0 = gqa_source(k), gqa_source(v)
        # Only without a mask tensor: SDPA's flash and math kernels take enable_gqa, the
        # memory-efficient one (the masked path) does not.
        if mask is None and k0 and v0 and k0[1] == v0[1]:
            k, v, kwargs["enable_gqa"] = k0[0], v0[0], True
        q = att.q
        if att.space is not None and len(att.space) != q_val.dim():
            # The mask lives in another grouping of the batch dims: attend there, then view back.
            q, k, v = (regroup(g, t, att.space) for t in (q, k, v))
        sdpa = out = g.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        if att.nan_rows is not None:
            # softmax over a row of -inf is NaN in eager; SDPA returns 0 there: keep eager's NaN.
            has_key = g.call_function(aten.any.dim, (att.nan_rows, -1, True))
            out = g.call_function(aten.where.ScalarOther, (has_key, sdpa, math.nan))
        if q is not att.q:
            out = g.call_function(aten.reshape.default, (out, list(val(att.out).shape)))
    kind = "causal" if causal else ("mask-tensor" if mask is not None else "no-mask")
    sdpa.meta["kp_attention"] = info = tag(kind, att.lifted, att.score_bias)
    if info.get("mask_kind") == "mask_mod":
        sdpa.meta["kp_note"] = note(info)
    out.meta["val"] = val(att.out)  # until shape propagation: a later attention may read it (stacked layers)
    if q is att.q:
        sdpa.meta["val"] = val(att.out)
    att.out.replace_all_uses_with(out)
    erase_unused(att.out)
    _erase_matched(att.removed)  # dropout is "impure" to FX; SDPA took it over
    return kind


def _erased(node: fx.Node) -> bool:
    return not alive(node)


def _erase_matched(nodes: list) -> None:
    """Erase the matched chain's nodes that nothing uses any more, and what only they used."""
    pending = [n for n in nodes if not _erased(n)]
    while pending:
        dead = [n for n in pending if not n.users]
        if not dead:
            return
        for n in dead:
            if _erased(n):  # already gone with an earlier node's inputs
                continue
            inputs = n.all_input_nodes
            n.graph.erase_node(n)
            for i in inputs:
                if not _erased(i) and not i.users and i.op == "call_function":
                    erase_unused(i)
        pending = [n for n in pending if not _erased(n)]


def attention_to_sdpa(gm: fx.GraphModule) -> Matches:
    """Rewrite every provable attention in ``gm`` to SDPA; matches counted per mask kind."""
    counts = {"causal": 0, "mask-tensor": 0, "no-mask": 0}
    with memoized():  # one lift and proof per shared mask node, not per layer
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in SOFTMAX or _erased(node):
                continue
            att = match(node)
            if att is not None:
                counts[_rewrite(gm, att)] += 1
    if any(counts.values()):
        gm.recompile()
    return Matches(counts)
