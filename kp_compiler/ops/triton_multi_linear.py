"""``kp::multi_linear``'s few-row kernel: ``x @ [w_0; ...; w_{G-1}].T`` in one launch, weights read in place.

At decode size (1 to ``MAX_ROWS`` rows) a linear reads its weight and does little else, and a small one (the
q, k and v projections of a d=2048 Llama: 2-8 MB) costs about 5.5 us on an H200 whatever its size: a fixed
cost per launch (``bench/results/2026-12-02-h200-decode-kernels-ce01986.txt``). One launch over the weights
that read the same ``x`` pays it once.

A program owns ``BN`` output columns of one weight and walks all of ``K``: no split over ``K``, no atomics,
deterministic. The weights are found through a device table of their addresses and first output columns
(``[2G]`` int64, made once per weight set and kept outside any CUDA-graph pool: ``core/persistent.py``), so
nothing is stacked or copied; every weight has ``K`` contiguous columns, one row stride, and a row count that
is a multiple of ``BN`` (so a program's columns belong to one weight). ``y`` is ``[M, sum N]``.

Tile sizes per ``(BM, N, K, dtype)`` are timed once on the GPU among a few candidates (never under a stream
capture); under ``TRITON_INTERPRET=1`` the first that fits runs (CPU tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..core.persistent import capturing, persistent, to_device
from .triton_launch import Launcher, fastest

MAX_ROWS = 64
MAX_WEIGHTS = 4


@triton.jit
def _multi_linear(x_ptr, table_ptr, y_ptr, M, N, stride_x, stride_w, stride_y, E1, E2, E3,
                  K: tl.constexpr, G: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    pid = tl.program_id(0)
    c0 = pid * BN
    g = (c0 >= E1).to(tl.int32) + (c0 >= E2).to(tl.int32) + (c0 >= E3).to(tl.int32)  # E_i = N past the last
    w = tl.multiple_of(tl.load(table_ptr + g).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
    first = tl.load(table_ptr + G + g)  # the weight's first output column
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w_ptrs = w + (c0 - first + offs_n)[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats as integers in tl.dot; widening is exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        x_ptrs += BK
        w_ptrs += BK
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_y + (c0 + offs_n)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=offs_m[:, None] < M)


_LAUNCH = Launcher(_multi_linear)

# (BN, BK, num_warps, num_stages); BN must divide every weight's rows
CANDIDATES = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 6), (32, 256, 4, 4), (64, 128, 4, 4)]
_best: dict = {}
_tables: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(x2d: torch.Tensor, weights) -> bool:
    """Whether the kernel takes ``x2d`` ``[M, K]`` and these weights."""
    if not (0 < x2d.shape[0] <= MAX_ROWS and 2 <= len(weights) <= MAX_WEIGHTS and x2d.stride(1) == 1):
        return False
    if x2d.dtype not in (torch.bfloat16, torch.float16):
        return False
    w0 = weights[0]
    return all(w.dim() == 2 and w.dtype == x2d.dtype and w.device == x2d.device and w.shape[1] == x2d.shape[1]
               and w.stride() == (w0.stride(0), 1) and w.shape[0] % 16 == 0 and w.data_ptr() % 16 == 0
               for w in weights)


def _table(x2d: torch.Tensor, weights) -> torch.Tensor:
    """The weights' device table, made once per weight set and kept for the process (64 bytes each: a graph
    captured over the op reads it by address, so it is never dropped). A set first seen under a stream capture
    (its warm-up ran outside one with the same weights, so only in unusual orders) gets a table inside the
    graph (``core/persistent.to_device``)."""
    key = (x2d.device, tuple((w.data_ptr(), w.shape[0]) for w in weights))  # rows: the table's first columns
    table = _tables.get(key)
    if table is None:
        firsts, col = [], 0
        for w in weights:
            firsts.append(col)
            col += w.shape[0]
        host = torch.tensor([w.data_ptr() for w in weights] + firsts, dtype=torch.int64)
        if capturing():  # the graph's own copy (core/persistent.py)
            return to_device(host, x2d.device)
        table = _tables[key] = persistent(lambda: host.to(x2d.device))
    return table


class NoTileFits(RuntimeError):
    """No tile candidate fits this GPU's shared memory and registers for this shape."""


def run(x2d: torch.Tensor, weights, y: torch.Tensor, config=None) -> torch.Tensor:
    """Write ``x2d @ cat(weights).T`` into ``y`` (``[M, sum N]``, row-contiguous); ``supported`` must hold."""
    M, K = x2d.shape
    G = len(weights)
    N = y.shape[1]
    ends, col = [], 0
    for w in weights[:-1]:
        col += w.shape[0]
        ends.append(col)
    ends += [N] * (3 - len(ends))
    table = _table(x2d, weights)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    fits = [c for c in CANDIDATES if all(w.shape[0] % c[0] == 0 for w in weights)]

    def launch(cfg):
        bn, bk, warps, stages = cfg
        _LAUNCH((N // bn,), x2d, table, y, M, N, x2d.stride(0), weights[0].stride(0), y.stride(0), *ends,
                K=K, G=G, UPCAST=_interpreting(), BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)

    key = (bm, tuple(w.shape[0] for w in weights), K, x2d.dtype, x2d.device.index)
    if config is not None:
        launch(config)
    elif key in _best or _interpreting() or capturing():
        launch(_best.get(key, fits[0]))
    else:
        best = fastest(fits, launch, reps=5)
        if best is None:
            raise NoTileFits(f"kp::multi_linear: no tile candidate fits this GPU ({[c[:2] for c in fits]})")
        _best[key] = best
        launch(best)
    return y
