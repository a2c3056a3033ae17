"""``attention-to-sdpa``: plain-PyTorch attention onto ``scaled_dot_product_attention``.

Matches, around every ``softmax`` over the last dim::

    scores = matmul(q', k'^T)                # matmul or bmm; k'^T a transpose of k or any tensor
    scores = scores * c | scores / c         # any number of scalar scalings (also on q' or k')
    scores = scores.float()                  # optional upcast (anywhere before the softmax)
    scores = tanh(scores / cap) * cap        # optional softcap (Gemma2): left for attention-kernels,
                                             # since only FlexAttention (a score_mod) expresses it
    scores = scores + bias                   # optional additive float mask (at most one)
    scores = scores.masked_fill(~keep, -inf) # optional boolean mask (at most one)
    p = softmax(scores, -1)[.to(dtype)]      # optional cast back
    p = dropout(p, prob, train)              # optional
    out = matmul(p, v)

Views that regroup static batch dims ([B*H, L, S] <-> [B, H, L, S]) may sit in
the chain (MBart adds its mask in the 4-D view of 3-D scores); SDPA then runs
on q, k, v viewed the same way and the result is viewed back.

SDPA calls already in the graph (transformers' ``sdpa`` path) get their
``attn_mask`` proven the same way (``given.py``): causal becomes
``is_causal``, other structured masks are tagged for ``attention-kernels``.

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

from ...core import context
from ...core.graph import alive, erase_dead, val
from ...core.pattern import P
from ...core.rules import Matches
from .given import lift_given_sdpa
from .layout import gqa_source, regroup, untranspose
from .mask_mod import memoized
from .scalars import CASTS, bias_as_keep, cast_dtype, const_scalar, is_mask_fill, sym_sqrt_of
from .sdpa_mask import note, sdpa_mask, tag
from .site import META_KEY, Attention

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
SCALES = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)
# Scaling the scores in place (Falcon: ``scores /= sqrt(d)``) writes only to storage the chain owns:
# every link up to ``q @ k^T`` has this chain as its only reader, so no one else sees the write.
IN_PLACE_SCALES = (aten.mul_.Tensor, aten.div_.Tensor, aten.mul_.Scalar, aten.div_.Scalar)
MULS = (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar)
VIEWS = (aten.view.default, aten.reshape.default)


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


def _one_reader(node: fx.Node) -> bool:
    return len(_value_users(node)) == 1


def _float_cast(node) -> bool:
    return cast_dtype(node) is not None


def _scale_factor(arg) -> bool:
    return const_scalar(arg) not in (None, 0) or _symbolic_float(arg)


def _constant_factor(arg) -> bool:
    return const_scalar(arg) not in (None, 0)


def _symbolic_float(arg) -> bool:
    """A SymFloat node: a module's float attribute (``self.scaling``) under ``dynamic=True`` arrives so."""
    return isinstance(arg, fx.Node) and isinstance(val(arg), torch.SymFloat)


def _alpha_one(node: fx.Node) -> bool:
    return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1


def _is_node(x) -> bool:
    return isinstance(x, fx.Node)


def _fills(fill_ok, **kw) -> P:
    """``masked_fill(x, not_keep, fill)`` or ``where(keep, x, fill)`` with ``fill_ok(fill)``."""
    fill = P.var("fill", where=lambda a: fill_ok(const_scalar(a)))
    return (P((aten.masked_fill.Scalar, aten.masked_fill.Tensor), P.var("x"), P.var("not_keep"), fill, **kw)
            | P((aten.where.self, aten.where.ScalarOther), P.var("keep"), P.var("x"), fill, **kw))


def _baddbmm_ok(node: fx.Node) -> bool:
    """``baddbmm(bias, q, k^T, beta=1, alpha=c)`` with ``c`` a number: ``bias + c * (q @ k^T)`` (BLOOM's ALiBi)."""
    return len(node.args) == 3 and node.kwargs.get("beta", 1) == 1 and const_scalar(node.kwargs.get("alpha", 1)) is not None


def _qk(**kw) -> P:
    """``q @ k^T`` (``matmul``/``bmm``), ``baddbmm`` of a bias and that product, or a two-operand einsum."""
    return (P(MATMUL, P.var("q"), P.var("kt"), **kw)
            | P(aten.baddbmm.default, P.var("qk_bias", where=_is_node), P.var("q"), P.var("kt"), where=_baddbmm_ok,
                **kw)
            | P(aten.einsum.default, where=lambda n: _einsum_operands(n, "qk") is not None, **kw))


# Links between q @ k^T and the softmax, each read by the next link only.
_cast = P(CASTS, P.var("x"), where=_float_cast, users=_one_reader)
_regroup = P(VIEWS, P.var("x"), where=_regroups_batch, users=_one_reader)
_fill = _fills(is_mask_fill, users=_one_reader)
_bias = P(aten.add.Tensor, P.var("x", where=lambda n: _REACHES_QK.find(n) is not None),
          P.var("bias", where=_is_node), commute=True, where=_alpha_one, users=_one_reader)
_div_sqrt = P((aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar), P.var("x"), P.var("e", where=sym_sqrt_of), users=_one_reader)
_scale = P(SCALES + IN_PLACE_SCALES, P.var("x"), P.var("c", where=_scale_factor), users=_one_reader)

# Softcapping (Gemma2): ``tanh(s / cap) * cap``, also spelled ``tanh(s * (1 / cap)) * cap``.
_softcap = P(MULS[:2], P(aten.tanh.default, P(SCALES, P.var("x"), P.var("cap_in", where=_constant_factor),
                                                name="cap_scale", users=_one_reader), users=_one_reader),
             P.var("cap", where=_constant_factor), commute=True, users=_one_reader)

# Masks first (nearest the softmax), then at most one softcap, then scalings: ``(s + bias) * c`` would
# scale the bias too, and a scaling outside the tanh is not a scaling of q @ k^T.
SCORES = P.skip(_cast | _regroup | _fill | _bias,
                P.skip(_softcap,
                       P.skip(_cast | _regroup | _div_sqrt | _scale, _qk(name="qk", users=_one_reader),
                              name="scalings"),
                       name="softcaps", max=1),
                name="masks")

# Softmax, then any float casts, a dropout and a regrouping of the batch dims (BLOOM), into ``p @ v``.
_PROBS = P.skip(P(CASTS, P.var("x"), where=_float_cast, users=1) | P(aten.dropout.default, P.var("x"), users=1)
                | P(VIEWS, P.var("x"), where=_regroups_batch, users=1),
                P(SOFTMAX, SCORES, P.var("dim"), name="softmax", users=1), name="after")
ATTENTION = (P(MATMUL, _PROBS, P.var("v"), name="out")
             | P(aten.einsum.default, P.var("equation"), [_PROBS, P.var("v")], name="out",
                 where=lambda n: _einsum_operands(n, "pv") is not None))

# Whether an add's operand leads up to q @ k^T (it is the scores; the other is the bias).
_REACHES_QK = P.skip(P(CASTS + SCALES + VIEWS + (aten.tanh.default,), P.var("x")) | _fills(lambda c: c is not None),
                     _qk(), max=9)

# Constant scalings on q or k themselves.
_PEEL = P.skip(P(SCALES, P.var("x"), P.var("c", where=_scale_factor)), P.var("t"), name="scalings")


def _scaled(att: Attention, links: list) -> None:
    for node, caps in links:
        if _symbolic_float(caps["c"]):  # applied to q before SDPA (_rewrite): SDPA's scale is a number
            att.sym_scales.append((caps["c"], node.target in MULS))
            continue
        c = const_scalar(caps["c"])
        att.scale *= c if node.target in MULS else 1.0 / c


def _peel(node, att: Attention):
    caps = _PEEL.find(node)
    _scaled(att, caps["scalings"])
    return caps["t"]


def _invert(not_keep):
    """The keep mask for ``masked_fill(s, not_keep, -inf)``: peel a ``~``, else mark for inversion."""
    if isinstance(not_keep, fx.Node) and not_keep.target in (aten.bitwise_not.default, aten.logical_not.default):
        return not_keep.args[0]
    return ("not", not_keep)


def _attention(caps: dict) -> Optional[Attention]:
    """The ``Attention`` a match of ``ATTENTION`` describes, or None if a count or space rule fails."""
    p = caps["after"][0][0] if caps["after"] else caps["softmax"]  # what p @ v reads
    if caps["v"] is p:
        return None
    masks, scalings = caps["masks"], caps["scalings"]
    kinds = [("fill" in c, "bias" in c) for _, c in masks]
    if sum(f for f, _ in kinds) > 1 or sum(b for _, b in kinds) > 1 or sum("e" in c for _, c in scalings) > 1:
        return None
    spaces = [tuple(val(n).shape) for (n, _), (f, b) in zip(masks, kinds) if f or b]
    if len({len(s) for s in spaces}) > 1:
        return None  # a mask and a bias in two groupings of the batch dims
    qk = caps["qk"]
    att = Attention(q=None, k_t=None, v=caps["v"], out=caps["out"], removed=[caps["softmax"]])
    att.removed += [n for n, _ in caps["after"]][::-1] + [n for n, _ in masks + caps["softcaps"] + scalings] + [qk]
    for _, link in caps["softcaps"]:
        att.softcap = _softcap_value(link)
        if att.softcap is None:
            return None
    att.space = spaces[-1] if spaces else None
    for node, _ in caps["after"][::-1]:
        if node.target is aten.dropout.default:
            p, train = node.args[1], node.args[2]
            att.dropout_p = float(p) if train else 0.0
    for (node, link), (is_fill, is_bias) in zip(masks, kinds):
        if is_bias:
            att.bias = link["bias"]
        elif is_fill:
            att.fill = const_scalar(link["fill"])
            att.fill_then_bias = att.bias is not None
            keep = link["keep"] if "keep" in link else _invert(link["not_keep"])
            att.keep_mask = _unbroadcast(keep)
    for node, link in scalings:
        if "e" in link:
            att.sqrt_head_dim = sym_sqrt_of(link["e"])
    _scaled(att, [(n, c) for n, c in scalings if "c" in c])
    if qk.target is aten.baddbmm.default:
        if caps["softcaps"] or any("c" in c or "e" in c for _, c in scalings):
            return None  # a scaling or softcap after baddbmm applies to its bias too
        att.scale *= const_scalar(qk.kwargs.get("alpha", 1))
        att.qk_bias = qk.args[0]
        att.q, att.k_t = _peel(qk.args[1], att), _peel(qk.args[2], att)
    elif qk.target in MATMUL:
        att.q, att.k_t = _peel(qk.args[0], att), _peel(qk.args[1], att)
    else:
        q, k = _einsum_operands(qk, "qk")
        att.q, att.k = _peel(q, att), _peel(k, att)
    return att


def _softcap_value(link: dict) -> Optional[float]:
    """``cap`` when the link is ``tanh(s / cap) * cap`` (or ``tanh(s * r) * cap`` with ``r * cap == 1``)."""
    cap, inner = const_scalar(link["cap"]), const_scalar(link["cap_in"])
    if cap is None or inner is None or cap <= 0:
        return None
    if link["cap_scale"].target in MULS:
        inner = 1.0 / inner
    return float(cap) if math.isclose(inner, cap, rel_tol=1e-6) else None


def match(softmax: fx.Node) -> Optional[Attention]:
    """The attention around ``softmax``, or None if any precondition fails."""
    x, dim = softmax.args[0], softmax.args[1]
    vx = val(x)
    if not isinstance(vx, torch.Tensor) or dim % vx.dim() != vx.dim() - 1:
        return None
    end = softmax
    for _ in range(8):  # down the single users (casts, dropout) to the p @ v the pattern is rooted at
        users = list(end.users)
        if len(users) != 1:
            return None
        end = users[0]
        caps = ATTENTION.find(end)
        if caps is not None and caps["softmax"] is softmax:
            break
    else:
        return None
    att = _attention(caps)
    if att is None:
        return None
    if att.bias is not None and att.keep_mask is None and bias_as_keep(att.bias) is not None:
        # transformers adds where(keep, 0, finfo.min): a boolean mask with a finite fill.
        keep, att.fill = bias_as_keep(att.bias)
        att.keep_mask, att.bias = _unbroadcast(keep), None
    if att.qk_bias is not None:
        if att.bias is not None or (att.keep_mask is not None and att.fill_then_bias):
            return None  # two additive biases
        att.bias = att.qk_bias  # in q @ k^T's grouping of the batch dims; _rewrite regroups it with q, k, v
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
        if att.qk_bias is not None and att.space is not None and len(att.space) != val(att.qk_bias).dim():
            att.bias = regroup(g, att.qk_bias, att.space)  # baddbmm's bias, in the mask's grouping
            att.bias.meta["val"] = val(att.qk_bias).reshape(*att.space[:-2], *val(att.qk_bias).shape[-2:])
        mask, causal = sdpa_mask(g, att, L, S, q_val.dtype)
        scale = None if att.sqrt_head_dim is not None else att.scale  # None: SDPA's 1/sqrt(E)
        kwargs = {"attn_mask": mask, "dropout_p": att.dropout_p, "is_causal": causal, "scale": scale}
        k0, v0 = gqa_source(k), gqa_source(v)
        # Only without a mask tensor: SDPA's flash and math kernels take enable_gqa, the
        # memory-efficient one (the masked path) does not.
        if mask is None and k0 and v0 and k0[1] == v0[1]:
            k, v, kwargs["enable_gqa"] = k0[0], v0[0], True
        q = att.q
        for factor, is_mul in att.sym_scales:  # (q * c) @ k^T == (q @ k^T) * c, for a symbolic float c
            q = g.call_function(aten.mul.Tensor if is_mul else aten.div.Tensor, (q, factor))
            q.meta["val"] = q_val
        if att.space is not None and len(att.space) != q_val.dim():
            # The mask lives in another grouping of the batch dims: attend there, then view back.
            q, k, v = (regroup(g, t, att.space) for t in (q, k, v))
        sdpa = out = g.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        if att.nan_rows is not None:
            # softmax over a row of -inf is NaN in eager; SDPA returns 0 there: keep eager's NaN.
            has_key = g.call_function(aten.any.dim, (att.nan_rows, -1, True))
            out = g.call_function(aten.where.ScalarOther, (has_key, sdpa, math.nan))
        if att.space is not None and len(att.space) != q_val.dim():
            out = g.call_function(aten.reshape.default, (out, list(val(att.out).shape)))
    kind = "causal" if causal else ("mask-tensor" if mask is not None else "no-mask")
    sdpa.meta[META_KEY] = info = tag(kind, att.lifted, att.score_bias)
    if info.mask_kind == "mask_mod":
        sdpa.meta["kp_note"] = note(info)
    out.meta["val"] = val(att.out)  # until shape propagation: a later attention may read it (stacked layers)
    if not (att.space is not None and len(att.space) != q_val.dim()):
        sdpa.meta["val"] = val(att.out)
    att.out.replace_all_uses_with(out)
    erase_dead([att.out, *att.removed])  # dropout is "impure" to FX; SDPA took it over
    return kind


def _note(text: str) -> None:
    ctx = context.current()
    if ctx is not None:
        ctx.notes.append(text)


def attention_to_sdpa(gm: fx.GraphModule) -> Matches:
    """Rewrite every provable attention in ``gm`` to SDPA; matches counted per mask kind."""
    counts = {"causal": 0, "mask-tensor": 0, "no-mask": 0, "sdpa-causal": 0, "sdpa-no-mask": 0, "sdpa-mask_mod": 0,
              "sdpa-data-mask": 0}
    with memoized():  # one lift and proof per shared mask node, not per layer
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in SOFTMAX or not alive(node):
                continue
            att = match(node)
            if att is not None and att.softcap is not None:
                _note(f"{node.name}: softcapped attention (cap {att.softcap:g}); SDPA cannot express it, "
                      "attention-kernels may take it to FlexAttention")
            elif att is not None:
                counts[_rewrite(gm, att)] += 1
        for node in list(gm.graph.nodes):  # SDPA calls the model made itself (transformers' sdpa path)
            kind = lift_given_sdpa(gm, node) if node.op == "call_function" and alive(node) else None
            if kind is not None:
                counts[kind] += 1
    erase_dead([n for n in gm.graph.nodes if n.meta.get("kp_made") and not n.users])  # unused helper nodes
    if any(counts.values()):
        gm.recompile()
    return Matches(counts)
