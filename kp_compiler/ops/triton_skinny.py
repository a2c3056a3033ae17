"""``skinny_linear(x, w)``: ``x @ w.T`` for a few rows (decode batches) as one Triton launch.

At decode size (``x`` of 1 to 64 rows, ``w`` an ``nn.Linear`` weight ``[N, K]``) a linear is a read of ``w``:
``N * K`` weights for ``M * N * K`` multiply-adds. Its speed is how many SMs stream ``w`` at once, so a
program owns ``BN`` columns (``BN`` small enough that ``N / BN`` programs fill the GPU) and walks all of
``K``; the row block ``BM`` is ``M`` rounded up to 16 (``tl.dot``'s smallest). No split over ``K``: no
atomics, no second pass, deterministic.

Tile sizes per ``(BM, N, K, dtype)`` are timed once on the GPU among a few candidates; under
``TRITON_INTERPRET=1`` the first candidate runs (CPU tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_launch import Launcher, cdiv

MAX_ROWS = 64


@triton.jit
def _skinny(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
            UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats as integers in tl.dot; widening is exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        x_ptrs += BK
        w_ptrs += BK
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_SKINNY = Launcher(_skinny)

# (BN, BK, num_warps, num_stages)
CANDIDATES = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4), (16, 512, 4, 3),
              (64, 256, 8, 3), (128, 128, 8, 3)]
_best: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``skinny_linear`` takes these: 2-D, at most ``MAX_ROWS`` rows, 16-bit floats of one dtype, unit
    stride along ``K``, one device."""
    return (x.dim() == 2 and w.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] == w.shape[1]
            and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.device == w.device
            and x.stride(1) == 1 and w.stride(1) == 1)


def block_rows(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config=None) -> torch.Tensor:
    """``x @ w.T`` (``supported(x, w)`` must hold); ``config``: one of ``CANDIDATES`` (else the timed best)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm = block_rows(M)

    def launch(cfg):
        bn, bk, warps, stages = cfg
        _SKINNY((cdiv(N, bn),), x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                UPCAST=_interpreting(), BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)

    if config is not None or _interpreting():
        launch(config or CANDIDATES[0])
        return y
    key = (bm, N, K, x.dtype, x.device.index)
    if key not in _best:
        _best[key] = _time_candidates(launch)
    launch(_best[key])
    return y


def _time_candidates(launch) -> tuple:
    timings = []
    for cfg in CANDIDATES:
        try:
            launch(cfg)
        except triton.runtime.errors.OutOfResources:
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            launch(cfg)
        end.record()
        end.synchronize()
        timings.append((start.elapsed_time(end), cfg))
    return min(timings, key=lambda t: t[0])[1]
