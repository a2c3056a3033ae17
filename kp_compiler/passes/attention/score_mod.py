"""Re-read an additive attention bias as a FlexAttention ``score_mod``.

A bias built from index arithmetic and constants (ALiBi: per-head slopes
times the query-key distance) is a function of the head, query and key
indices. ``lift_score_bias(bias, L, S)`` returns it as
``bias_fn(b, h, q_idx, kv_idx)``, so that ``score_mod = score + bias_fn(...)``
and no ``[H, L, S]`` tensor is ever written or read. It uses the same
lifting as ``mask_mod.py`` (float arithmetic, ``pow``, ``clamp`` and float
casts included), lets the head axis vary (batch must broadcast), and, since
float results can differ by rounding, proves the lift on the whole static
grid within the bias dtype's tolerance; symbolic lengths are not lifted.

Before (ALiBi, from ``bench/cases/attention.py``)::

    %arange = aten.arange.start(1, 17)                       # heads 1..H
    %div = aten.div.Tensor(%mul, 16)                         # -8 * h / H
    %pow = aten.pow.Scalar(2.0, %div)                        # slopes
    %unsqueeze_2 = aten.unsqueeze.default(%unsqueeze_1, 2)   # [H, 1, 1]
    %clamp = aten.clamp.default(%sub, 0)                     # max(q - kv, 0)
    %mul_1 = aten.mul.Tensor(%neg, %clamp)                   # [H, L, S]

After::

    bias_fn = lambda b, h, q_idx, kv_idx: -(2.0 ** (-8.0 * (1 + h) / 16)) * clamp(q_idx - kv_idx, 0, None)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import fx

from .mask_mod import Field, _known, _lift, _Sym
from .subgraph import evaluate

_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def lift_score_bias(bias: fx.Node, L: Any, S: Any) -> Optional[Callable]:
    """``bias_fn(b, h, q_idx, kv_idx)`` equal to the ``bias`` tensor on the ``L x S`` grid, or None."""
    if not (isinstance(L, int) and isinstance(S, int)):
        return None
    lifted = _lift(bias, {})
    if not isinstance(lifted, Field) or len(lifted.shape) > 4:
        return None
    rank = len(lifted.shape)
    if rank == 4 and not _known(lifted.shape[0] == 1):
        return None  # varies over the batch
    varying = {p for p in range(1, min(rank, 3) + 1) if not _known(lifted.shape[-p] == 1)}
    for p, size in ((1, S), (2, L)):
        if p in varying and not _known(lifted.shape[-p] == size):
            return None

    def bias_fn(b, h, q_idx, kv_idx):
        ix = {1: kv_idx if 1 in varying else 0, 2: q_idx if 2 in varying else 0, 3: h if 3 in varying else 0}
        return lifted.f({p: ix.get(p, 0) for p in range(1, rank + 1)})

    heads = lifted.shape[-3] if 3 in varying else 1
    return bias_fn if _same_values(bias, bias_fn, heads, L, S) else None


def _same_values(bias: fx.Node, bias_fn: Callable, heads: int, L: int, S: int) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    dense = evaluate(bias)
    if dense is None or not dense.is_floating_point() or not isinstance(heads, int):
        return False
    with unset_fake_temporarily(), torch.no_grad():
        h = torch.arange(heads, device=dense.device)[:, None, None]
        q = torch.arange(L, device=dense.device)[:, None]
        kv = torch.arange(S, device=dense.device)[None, :]
        lifted = torch.as_tensor(bias_fn(0, h, q, kv), device=dense.device).float()
        try:
            dense = dense.float().reshape(-1, *dense.shape[-3:] if dense.dim() >= 3 else (1, *dense.shape))
            if dense.shape[0] != 1:
                return False
            want, got = dense[0].expand(heads, L, S), lifted.expand(heads, L, S)
        except RuntimeError:  # does not broadcast to the grid
            return False
        tol = _TOLERANCE.get(evaluate(bias).dtype, 1e-5)
        return bool(torch.allclose(got, want, rtol=tol, atol=tol))


def describe_bias(bias_fn: Callable) -> str:
    """The lifted bias as an expression in ``h``, ``q_idx`` and ``kv_idx``."""
    return str(bias_fn(_Sym("b"), _Sym("h"), _Sym("q_idx"), _Sym("kv_idx")))
