"""The rows' part of ``kp::linear_cross_entropy`` as one Triton kernel: ``linear_cross_entropy.rows`` fused.

One program per token row of a chunk's logits ``z [n, V]`` (16-bit or fp32, unit stride along ``V``):

1. a pass over the row in blocks of ``BLOCK``: the softcapped logit in fp32, an online max and sum of
   exponentials (the log-sum-exp), the sum of the logits (label smoothing) and the label's logit;
2. the row's loss, 0 for an ignored label;
3. a second pass writing ``scale * (softmax - (1 - eps) * onehot - eps / V)`` (times the softcap's derivative)
   over the row in place, in ``z``'s dtype: the gradient of the loss with respect to the logits.

So the logits are read twice and written once, against about a dozen passes of ATen's version in fp32.
Equal to ``linear_cross_entropy.rows`` (tested under ``TRITON_INTERPRET=1``); the tile (``config``) is
measured on the H200: 0.266 ms for a 1024 x 128256 bf16 chunk, 2.96 TB/s of the bytes it must move (a copy
reaches 3.9). The vocabulary size is a compile-time constant (a weight's static size;
the loop over it needs one under older Triton interpreters).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_launch import Launcher, next_power_of_2


@triton.jit
def _softcapped(z, SOFTCAP: tl.constexpr, cap):
    if SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(z / cap))  # tanh without overflow: sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        return t * cap, t
    return z, z


@triton.jit
def _rows(z_ptr, labels_ptr, scale_ptr, loss_ptr, stride, ignore_index, smoothing, cap,
          V: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    picked = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        ok = idx < V
        z, _ = _softcapped(tl.load(base + idx, mask=ok, other=0.0).to(tl.float32), SOFTCAP, cap)
        zm = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
        m = m_new
        total += tl.sum(tl.where(ok, z, 0.0), axis=0)
        picked += tl.sum(tl.where(idx == label, z, 0.0), axis=0)
    lse = m + tl.log(s)
    loss = (1.0 - smoothing) * (lse - picked) + smoothing * (lse - total / V)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
    for i in range(0, tl.cdiv(V, BLOCK)):
        # REVERSE: the last blocks the first pass read come first, while they may still be in L2
        start = (tl.cdiv(V, BLOCK) - 1 - i) * BLOCK if REVERSE else i * BLOCK
        idx = start + cols
        ok = idx < V
        z, t = _softcapped(tl.load(base + idx, mask=ok, other=0.0).to(tl.float32), SOFTCAP, cap)
        g = tl.exp(z - lse) - tl.where(idx == label, 1.0 - smoothing, 0.0) - smoothing / V
        g = g * scale
        if SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(base + idx, g.to(z_ptr.dtype.element_ty), mask=ok)


_ROWS = Launcher(_rows)


def supported(z: torch.Tensor) -> bool:
    """A 2-D chunk of 16-bit or fp32 logits, unit stride along the vocabulary."""
    return z.dim() == 2 and z.stride(1) == 1 and z.dtype in (torch.bfloat16, torch.float16, torch.float32)


def rows(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float, softcap: float,
         scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> tuple:
    """``linear_cross_entropy.rows``, with the gradient written over ``z`` (a chunk's fresh logits) and the
    losses into ``out`` (fp32, contiguous) when given."""
    n, vocab = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device) if out is None else out
    if n:
        launch(z, labels, scale, loss, ignore_index, smoothing, softcap, *config(vocab))
    return loss, z


def config(vocab: int) -> tuple:
    """(``BLOCK``, warps, ``REVERSE``) for a vocabulary. Measured on the H200 at 1024 x 128256 bf16
    (``scripts/gpu_lce_rows_sweep.py`` at c2a320b, 36 tiles): 4096 columns, 8 warps, the second pass reversed,
    0.266 ms (2.96 TB/s of the 0.79 GB it moves); 0.271 ms unreversed. A variant keeping per-lane statistics
    (no cross-warp reduction per block) was at best 0.276 ms and was removed. ``KP_LCE_TILE=BLOCK,warps,reverse``
    (``reverse``: 0 or 1) overrides it, for measuring a tile in a whole step."""
    forced = os.environ.get("KP_LCE_TILE", "")
    if forced:
        parts = forced.split(",")
        ok = len(parts) == 3 and all(p.isdigit() for p in parts)
        block, warps, reverse = (int(p) for p in parts) if ok else (0, 0, 0)
        if not (ok and 16 <= block <= 65536 and block & (block - 1) == 0 and warps in (1, 2, 4, 8, 16, 32)
                and reverse in (0, 1)):
            raise ValueError(f"KP_LCE_TILE={forced!r}: want BLOCK,warps,reverse (a power of two from 16 to "
                             "65536, 1-32 warps as a power of two, 0 or 1)")
        return block, warps, bool(reverse)
    block = min(4096, next_power_of_2(vocab))
    return block, 8 if block >= 2048 else 4, True


def launch(z, labels, scale, loss, ignore_index, smoothing, softcap, block, warps, reverse) -> None:
    """The kernel over every row of ``z`` with an explicit tile (``rows`` picks it; the GPU sweep tries others)."""
    _ROWS((z.shape[0],), z, labels.contiguous(), scale.float(), loss, z.stride(0), ignore_index, float(smoothing),
          float(softcap) or 1.0, V=z.shape[1], SOFTCAP=bool(softcap), BLOCK=block, REVERSE=bool(reverse),
          num_warps=warps)
