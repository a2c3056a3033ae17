"""Causal sliding-window attention on torch's flash kernel, which takes the window as an argument.

SDPA has no window argument, but the flash kernel beneath it does:
``aten._flash_attention_forward(q, k, v, ..., is_causal=True,
window_size_left=W - 1, window_size_right=0)`` keeps key ``j`` for query
``i`` exactly when ``i - W < j <= i`` (lengths equal). It takes q, k, v as
``[B, S, H, D]`` (the transposes are views of what a model's projections
made), k and v with fewer heads (GQA), and has a backward
(``aten._flash_attention_backward``); both are Inductor fallbacks. Unlike
FlexAttention it needs no block mask, so no compile-time mask build.

``window_of(mask_mod, L, S)`` proves a lifted mask is that window: it runs
the mask on the whole static grid and compares it with the window read off
its widest row. ``replace_sdpa(gm, sdpa, window)`` splices the call in.

Before::

    %sdpa = aten.scaled_dot_product_attention.default(%q, %k_rep, %v_rep, %mask, scale=0.125)  # mask_mod: window 1024

After::

    %t = aten.transpose.int(%q, 1, 2)  ... (k, v before their head repeats)
    %fa = aten._flash_attention_forward.default(%t, %t_1, %t_2, None, None, 4096, 4096, 0.0, True, False,
                                                scale=0.125, window_size_left=1023, window_size_right=0)
    %out = aten.transpose.int(getitem(%fa, 0), 1, 2)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import fx

from ...core.graph import erase_dead, val
from .flex import _splice, _trace
from .layout import gqa_source
from .mask_mod import describe

FLASH_FORWARD = torch.ops.aten._flash_attention_forward.default

_WINDOWS: dict = {}  # (describe(mask_mod), L, S) -> window or None


def window_of(mask_mod: Callable, L, S) -> Optional[int]:
    """``W`` when ``mask_mod`` keeps exactly ``q - W < kv <= q`` on the static ``L x S`` grid (``L == S``,
    ``W < S``), else None. A plain causal mask is not a window here (it is SDPA's ``is_causal``)."""
    if not (isinstance(L, int) and isinstance(S, int)) or L != S or L < 2:
        return None
    key = (describe(mask_mod), L, S)
    if key not in _WINDOWS:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(S)[None, :]
            dense = torch.as_tensor(mask_mod(None, None, q_idx, kv_idx)).expand(L, S)
            window = int(dense.sum(-1).max())
            exact = (kv_idx <= q_idx) & (q_idx - kv_idx < window)
            _WINDOWS[key] = window if 0 < window < S and bool(torch.equal(dense, exact)) else None
        if len(_WINDOWS) > 256:
            _WINDOWS.pop(next(iter(_WINDOWS)))
    return _WINDOWS[key]


def replace_sdpa(gm: fx.GraphModule, sdpa: fx.Node, window: int) -> Optional[str]:
    """Put the windowed flash call in place of ``sdpa``; None when done, else why not."""
    q, k, v = sdpa.args[:3]
    k0, v0 = gqa_source(k), gqa_source(v)
    if k0 and v0 and k0[1] == v0[1]:  # heads repeated for the masked SDPA path: flash groups them itself (GQA)
        k, v = k0[0], v0[0]
    qv = val(q)
    L, S = qv.shape[-2], val(k).shape[-2]
    scale = sdpa.kwargs.get("scale")

    def attend(q, k, v):
        out = FLASH_FORWARD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, L, S, 0.0,
                            True, False, scale=scale, window_size_left=window - 1, window_size_right=0)[0]
        return out.transpose(1, 2)

    traced = _trace(attend, qv, val(k), val(v))
    with gm.graph.inserting_before(sdpa):
        out = _splice(gm, traced, (q, k, v), ("flash-window", window))
    out.meta.update({k_: v_ for k_, v_ in sdpa.meta.items() if k_ != "val"})
    out.meta["kp_note"] = f"flash attention, causal window {window} (aten._flash_attention_forward)"
    sdpa.replace_all_uses_with(out)
    erase_dead([sdpa, *[a for a in sdpa.args[1:3] if isinstance(a, fx.Node)]])
    return None
