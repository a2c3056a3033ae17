"""``options["fp8"]`` parsed: one frozen dataclass, every default stated here once.

``parse_fp8`` takes what a user writes (``None``/``False``: off, ``True``: the defaults, or a dict of the
fields below) and returns ``None`` or an ``FP8Options``; a bad key or value raises ``ValueError`` naming it.
The ``fp8-linear`` pass reads it from ``context.current().options.fp8``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

RECIPES = ("tensorwise", "rowwise", "delayed", "static")
CASTS = ("ops", "inductor")


@dataclass(frozen=True)
class FP8Options:
    recipe: str = "tensorwise"  # see docs/passes/fp8.md
    include: tuple = ()  # globs on module paths: only these convert (empty: all)
    exclude: tuple = ()  # globs on module paths that never convert
    emulate: bool = False  # convert on any device through the exact emulation
    min_dims: Optional[tuple] = None  # (M, K, N) thresholds replacing the device's size-table row
    history_len: int = 16  # delayed: amax history length, 1 to 1024
    margin: float = 0.0  # delayed: scale headroom in powers of 2, 0 to 8
    fast_accum: bool = True  # the forward GEMM accumulates in the GPU's fast FP8 mode; gradients never do
    fuse_gated: bool = False  # training, tensorwise: a gated MLP's three linears in one op (passes/fp8/gated.py)
    casts: str = "inductor"  # training, tensorwise, Inductor: ATen ops (ops/fp8_traced.py); "ops": own kernels


KEYS = tuple(f.name for f in fields(FP8Options))


def parse_fp8(value: Any) -> Optional[FP8Options]:
    if value is None or value is False:
        return None
    if value is True:
        return FP8Options()
    if isinstance(value, FP8Options):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"kernelpytorch: options['fp8'] must be None, True or a dict, got {value!r}")
    unknown = sorted(k for k in value if k not in KEYS)
    if unknown:
        raise ValueError(f"kernelpytorch: unknown key(s) {unknown} in options['fp8']; valid: {list(KEYS)}")
    recipe = value.get("recipe", FP8Options.recipe)
    if recipe not in RECIPES:
        raise ValueError(f"kernelpytorch: fp8 recipe={recipe!r} is not one of {list(RECIPES)}")
    for key in ("include", "exclude"):
        globs = value.get(key, [])
        if not (isinstance(globs, (list, tuple)) and all(isinstance(x, str) for x in globs)):
            raise ValueError(f"kernelpytorch: options['fp8'][{key!r}] must be a list of glob strings, got {globs!r}")
    dims = value.get("min_dims")
    if dims is not None and (not isinstance(dims, (list, tuple)) or len(dims) != 3
                             or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise ValueError(f"kernelpytorch: options['fp8']['min_dims'] must be three positive ints [M, K, N], got {dims!r}")
    for key in ("emulate", "fast_accum", "fuse_gated"):
        if key in value and not isinstance(value[key], bool):
            raise ValueError(f"kernelpytorch: options['fp8'][{key!r}] must be True or False, got {value[key]!r}")
    casts = value.get("casts", FP8Options.casts)
    if casts not in CASTS:
        raise ValueError(f"kernelpytorch: options['fp8']['casts']={casts!r} is not one of {list(CASTS)}")
    for key in ("history_len", "margin"):
        if key in value and recipe != "delayed":
            raise ValueError(f"kernelpytorch: options['fp8'][{key!r}] applies to recipe 'delayed' only, not {recipe!r}")
    n = value.get("history_len", FP8Options.history_len)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ValueError(f"kernelpytorch: options['fp8']['history_len'] must be an int from 1 to 1024, got {n!r}")
    margin = value.get("margin", FP8Options.margin)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 8:
        raise ValueError(f"kernelpytorch: options['fp8']['margin'] must be a number from 0 to 8 (powers of 2 of "
                         f"headroom), got {margin!r}")
    return FP8Options(recipe=recipe, include=tuple(value.get("include", ())), exclude=tuple(value.get("exclude", ())),
                      emulate=value.get("emulate", False), min_dims=None if dims is None else tuple(dims),
                      history_len=n, margin=float(margin), fast_accum=value.get("fast_accum", True),
                      fuse_gated=value.get("fuse_gated", False), casts=casts)
