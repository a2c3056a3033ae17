"""Splice ``flex_attention`` with a cached block mask in place of an SDPA node.

``replace_sdpa(gm, sdpa, mask_mod, key)`` builds the block mask for the
static lengths (once per ``key``, lengths and device, shared by every layer
and graph), traces ``flex_attention(q, k, v, block_mask=..., scale=...)``
under the graph's fake mode, and copies the traced nodes into ``gm``. The
block-mask tensors become buffers of ``gm`` (with a source, so AOTAutograd
lifts them as static inputs like parameters): they are computed at compile
time, never per call.

Before::

    %sdpa = aten.scaled_dot_product_attention.default(%q, %k, %v, attn_mask=%keep, dropout_p=0.0, is_causal=False, scale=0.25) : f32[1, 2, 64, 16]

After::

    %kp_block_mask_0 = get_attr[kp_block_mask_0] : i32[1, 1, 4]
    ...
    %flex_attention = higher_order.flex_attention(%q, %k, %v, %kp_flex_score_0, (64, 64, %kp_block_mask_0, ...), 0.25, ...)
    %getitem = getitem(%flex_attention, 0) : f32[1, 2, 64, 16]
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

from ...core import context
from ...core.graph import erase_dead, val
from ...ops import block_masks
from .kernel_table import specialize_head_dim
from .layout import gqa_source
from .mask_mod import every_row_attends
from .site import sdpa_arguments

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 64
GUARDS_WHY = ("flex compiles one kernel per head dim, so a symbolic head dim is guarded to its value; tracing "
              "flex on symbolic lengths records whether the block tables hold one block or more (lengths up to "
              "128 and longer ones compile apart); the lengths themselves stay symbolic")


def block_mask_for(mask_mod: Callable, key: str, L: int, S: int, device: torch.device):
    """``(block_mask, every_row_has_a_key)`` for ``mask_mod`` at ``L x S``, cached by ``key``."""
    from torch.nn.attention.flex_attention import create_block_mask

    cache_key = (key, L, S, str(device))
    if cache_key in _CACHE:
        _CACHE.move_to_end(cache_key)
        return _CACHE[cache_key]
    rows_ok = every_row_attends(mask_mod, L, S)
    with unset_fake_temporarily(), torch.no_grad():
        block_mask = create_block_mask(mask_mod, None, None, L, S, device=device)
    _CACHE[cache_key] = (block_mask, rows_ok)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return block_mask, rows_ok


def replace_sdpa(gm: fx.GraphModule, sdpa: fx.Node, mask_mod: Optional[Callable], key: str,
                 score_bias: Optional[Callable] = None, kernel_options: Optional[dict] = None) -> Optional[str]:
    """Put ``flex_attention`` in place of ``sdpa``; None when done, else why not.

    ``mask_mod`` None: no block mask (every pair attends); ``score_bias``: ``score_mod`` adds it.
    """
    q, k, v = sdpa.args[:3]
    if sdpa_arguments(sdpa).get("dropout_p", 0.0):
        return "flex_attention has no dropout"
    refusal = splice(gm, sdpa, q, k, v, scale=sdpa.kwargs.get("scale"), gqa=bool(sdpa.kwargs.get("enable_gqa")),
                     mask_mod=mask_mod, key=key, score_bias=score_bias, kernel_options=kernel_options)
    if refusal is None:
        repeated = [a for a in sdpa.args[1:3] if isinstance(a, fx.Node)]
        erase_dead([sdpa, *repeated])
    return refusal


def splice(gm: fx.GraphModule, replaced: fx.Node, q, k, v, *, scale, gqa: bool, mask_mod: Optional[Callable],
           key: str, score_bias: Optional[Callable] = None, softcap: Optional[float] = None,
           kernel_options: Optional[dict] = None) -> Optional[str]:
    """``flex_attention(q, k, v)`` in place of ``replaced`` (its users moved over); None when done, else why not.

    ``kernel_options`` go to ``flex_attention`` as they are (the ``flex_kernel_options`` option).

    The score_mod applies ``tanh(s / softcap) * softcap`` first, then adds ``score_bias``, as eager
    does with a softcap and a mask or bias; ``replaced`` and what only it read are left to the caller.
    """
    from torch.nn.attention.flex_attention import flex_attention

    k0, v0 = gqa_source(k, symbolic_groups=True), gqa_source(v, symbolic_groups=True)
    if k0 and v0 and k0[1] == v0[1]:  # heads repeated for the masked SDPA path: flex takes GQA
        k, v, gqa = k0[0], v0[0], True
    qv = val(q)
    L, S = qv.shape[-2], val(k).shape[-2]
    static = isinstance(L, int) and isinstance(S, int)
    tables = None  # with symbolic lengths: the eight block-table nodes kp::flex_block_mask makes at run time
    if mask_mod is None and not static:
        return "symbolic lengths and no mask: not lifted (the run-time block tables are made for lifted masks)"
    if mask_mod is not None and static:
        block_mask, rows_ok = block_mask_for(mask_mod, key, L, S, qv.device)
    elif mask_mod is not None:
        if isinstance(scale, fx.Node):
            return "a symbolic scale with symbolic lengths"
        rows_ok = every_row_attends(mask_mod, L, S)
        if rows_ok and not key_is_length_free(key):
            return f"the mask reads more than q_idx and kv_idx ({key}): no block mask per length"
        tables = _runtime_block_mask(gm, replaced, q, k, mask_mod, key) if rows_ok else None
    else:
        block_mask, rows_ok = None, True
    if not rows_ok:
        return ("a query row has no key to attend to (eager gives NaN or uniform weights there, flex zeros)"
                + ("" if static else "; with symbolic lengths this needs L <= S and a mask proven to keep "
                   "the diagonal"))
    score_mod = _score_mod(score_bias, softcap) if score_bias is not None or softcap is not None else None

    head_dim = specialize_head_dim(qv)
    if not static or not isinstance(qv.shape[-1], int):
        ctx = context.current()
        if ctx is not None:
            ctx.shape_guards_by_design(GUARDS_WHY)

    def attend(q, k, v, *parts):
        if parts:
            mask = block_masks.block_mask(parts, q.shape[-2], k.shape[-2], mask_mod)
            return _flex_hop(q, k, v, score_mod, mask, scale if scale is not None else head_dim ** -0.5,
                             kernel_options)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                              kernel_options=kernel_options)

    inputs = (q, k, v) + (tuple(tables) if tables is not None else ())
    traced = _trace(attend, *(val(a) for a in inputs))
    with gm.graph.inserting_before(replaced):
        out = _splice(gm, traced, inputs, (key, str(L), str(S), str(qv.device)))
    out.meta.update({k_: v_ for k_, v_ in replaced.meta.items() if k_ != "val"})
    out.meta["kp_note"] = "flex_attention output" + (f"; mask_mod: {key}" if key else "") + (
        f"; score_mod: {describe_score_mod(score_bias, softcap)}" if score_mod is not None else "") + (
        f"; kernel_options: {kernel_options}" if kernel_options else "")
    replaced.replace_all_uses_with(out)
    return None


def _flex_hop(q, k, v, score_mod, block_mask, scale: float, kernel_options):
    """The flex HOP called directly: ``flex_attention`` itself runs Dynamo over the mask_mod, which under
    symbolic lengths captures the graph's sizes as extra mask inputs that Inductor then rejects."""
    from torch.nn.attention.flex_attention import _apply_kernel_options

    options = _apply_kernel_options(q, k, v, False, kernel_options)
    out = torch.ops.higher_order.flex_attention(q, k, v, score_mod or _identity, block_mask.as_tuple(), scale,
                                                options)
    return out[0]


def _identity(score, b, h, q_idx, kv_idx):
    return score


def key_is_length_free(key: str) -> bool:
    """The mask text names only ``q_idx`` and ``kv_idx`` (no symbolic length captured from the graph)."""
    import re

    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", key)) <= {"q_idx", "kv_idx", "abs", "True", "False"}


def _runtime_block_mask(gm: fx.GraphModule, site: fx.Node, q: fx.Node, k: fx.Node, mask_mod: Callable,
                        key: str) -> list:
    """The ``kp::flex_block_mask`` nodes (its eight tensors) for ``key`` at the lengths of ``q`` and ``k``,
    one op per graph (reused by every later site with the same mask and lengths)."""
    block_masks.register(key, mask_mod)
    L, S, device = val(q).shape[-2], val(k).shape[-2], val(q).device
    made = gm.meta.setdefault("kp_flex_runtime_masks", {})
    cache_key = (key, str(L), str(S), str(device))
    nodes = made.get(cache_key)
    if nodes is not None and nodes[0].graph is gm.graph and _before(nodes[-1], site):
        return nodes

    def make(q, k):
        return tuple(torch.ops.kp.flex_block_mask(key, q.shape[-2], k.shape[-2], q.device))

    traced = _trace(make, val(q), val(k))
    with gm.graph.inserting_before(site):
        nodes = _splice(gm, traced, (q, k), (key, "runtime"), every_output=True)
    made[cache_key] = nodes
    return nodes


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def describe_score_mod(score_bias: Optional[Callable], softcap: Optional[float]) -> str:
    """The score_mod as text: ``tanh(score / 50) * 50 + ...``; a bias alone reads ``score + bias``."""
    text = f"tanh(score / {softcap:g}) * {softcap:g}" if softcap is not None else "score"
    return text + (" + bias" if score_bias is not None else "")


def _score_mod(score_bias: Optional[Callable], softcap: Optional[float]) -> Callable:
    """``score_mod``: the softcap, then the lifted bias, as eager applies them."""
    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if score_bias is not None:
            score = score + score_bias(b, h, q_idx, kv_idx)
        return score
    return score_mod


def _trace(fn: Callable, *fakes) -> fx.GraphModule:
    """``fn`` traced to pre-dispatch ATen on the graph's fake tensors (block-mask tensors stay real)."""
    fake_mode = fakes[0].fake_mode
    allowed = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        with fake_mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_fx(fn, pre_dispatch=True)(*fakes)
    finally:
        fake_mode.allow_non_fake_inputs = allowed


def _splice(gm: fx.GraphModule, traced: fx.GraphModule, inputs: tuple, mask_key: tuple, every_output: bool = False):
    """Copy ``traced``'s nodes into ``gm`` at the insertion point; return its first output (all of them, as a
    list, with ``every_output``).

    The block-mask tensors of one ``mask_key`` become one set of buffers, shared by every site.
    """
    names = gm.meta.setdefault("kp_flex_names", {})  # (mask_key, ordinal) -> buffer name
    ordinal = 0
    env: dict = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = node.args[0]
            if every_output:
                return [env[r] for r in result]
            return env[result[0] if isinstance(result, (tuple, list)) else result]
        if node.op == "get_attr":
            obj = getattr(traced, node.target)
            env[node] = _attr(gm, obj, names, (mask_key, ordinal))
            ordinal += isinstance(obj, torch.Tensor)
            env[node].meta.update(node.meta)
            continue
        env[node] = gm.graph.node_copy(node, lambda a: env[a])
    raise AssertionError("traced flex_attention graph has no output")


def _attr(gm: fx.GraphModule, obj, names: dict, key: tuple) -> fx.Node:
    if isinstance(obj, torch.nn.Module):
        name = _fresh(gm, "kp_flex_fn")
        gm.add_submodule(name, obj)
        return gm.graph.get_attr(name)
    if key not in names:
        name = _fresh(gm, "kp_block_mask")
        gm.register_buffer(name, obj)
        if hasattr(gm, "_param_name_to_source"):
            # AOTAutograd maps every buffer to a source; these come from no user code.
            from torch._dynamo.source import ConstantSource

            gm._param_name_to_source = {**gm._param_name_to_source, name: ConstantSource(name)}
        names[key] = name
    return gm.graph.get_attr(names[key])


def _fresh(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"
