"""Quantized weights kept between calls, for inference.

A compiled inference graph (compiled under ``torch.no_grad()``) quantizes
each FP8 weight once: ``cached(w, key, make)`` returns what ``make()``
built the last time, as long as ``w`` is the same tensor with the same
storage (``data_ptr``) and version counter (``_version``). Any in-place
update through autograd's view of the tensor (``with torch.no_grad():
w.copy_(...)``, an optimizer step, ``load_state_dict``) bumps the version,
and assigning ``w.data = ...`` moves the storage, so a changed weight is
quantized again. Writes through ``w.data`` (``w.data.copy_(...)``) bump
only the detached alias's counter and are not seen: don't do that to a
compiled model's weights.

Entries are keyed by the tensor object (``WeakIdKeyDictionary``), so they
go when the weight does.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..core.persistent import capturing, persistent

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
stats = {"hits": 0, "misses": 0}


def cached(w: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()``'s result for ``(w, key)``, rebuilt when ``w``'s storage or version changed."""
    stamp = (w.data_ptr(), w._version)
    entries = _CACHE.get(w)
    if entries is None:
        entries = _CACHE[w] = {}
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        stats["hits"] += 1
        return hit[1]
    stats["misses"] += 1
    if capturing():  # the graph's own copy, in its pool: not kept (core/persistent.py)
        return make()
    value = persistent(make)
    entries[key] = (stamp, value)
    return value


def clear() -> None:
    _CACHE.clear()
    stats.update(hits=0, misses=0)
