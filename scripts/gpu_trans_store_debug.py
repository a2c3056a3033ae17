"""Which way of storing a transposed FP8 tile gives the right bytes on this GPU (issue 19 diagnostics).

``triton_fp8_gated``'s cast wrote ``q(h).T`` wrong on the H200 when the tile came from ``tl.trans`` (of the
fp32 values or of the FP8 tile), though Triton's interpreter wrote it right; the shipped kernel recomputes
the tile from a transposed load instead, 20% slower. This times and checks each variant on one kernel that
computes ``silu(g) * u`` from bf16 ``g``, ``u`` and stores ``q`` and ``q.T`` (E4M3, scale 1):

- ``fp32trans``: ``tl.trans`` of the fp32 tile, then the cast;
- ``fp8trans``: the cast, then ``tl.trans``;
- ``u8trans``: the cast, a bitcast to uint8, ``tl.trans``, stored through a uint8 view;
- ``ptrs``: the FP8 tile stored at transposed addresses, no ``tl.trans`` (Triton converts the layout itself);
- ``load``: the tile computed again from a transposed load (the shipped kernel).

    PYTHONPATH=. python scripts/gpu_trans_store_debug.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

VARIANTS = {"fp32trans": 0, "fp8trans": 1, "u8trans": 2, "ptrs": 3, "load": 4}


@triton.jit
def _kernel(g_ptr, u_ptr, q_ptr, qt_ptr, qt8_ptr, R, RP, C, VARIANT: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    z = tl.load(g_ptr + r64[:, None] * C + c64[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64[:, None] * C + c64[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(z * tl.sigmoid(z) * u, -448.0, 448.0)
    q = y.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + r64[:, None] * C + c64[None, :], q, mask=mask)
    t_offs = c64[:, None] * RP + r64[None, :]
    t_mask = (cols[:, None] < C) & (rows[None, :] < RP)
    if VARIANT == 0:
        tl.store(qt_ptr + t_offs, tl.trans(y).to(qt_ptr.dtype.element_ty), mask=t_mask)
    elif VARIANT == 1:
        tl.store(qt_ptr + t_offs, tl.trans(q), mask=t_mask)
    elif VARIANT == 2:
        tl.store(qt8_ptr + t_offs, tl.trans(q.to(tl.uint8, bitcast=True)), mask=t_mask)
    elif VARIANT == 3:
        tl.store(qt_ptr + r64[:, None] + c64[None, :] * RP, q, mask=(rows[:, None] < RP) & (cols[None, :] < C))
    else:
        tmask = (rows[None, :] < R) & (cols[:, None] < C)
        zt = tl.load(g_ptr + r64[None, :] * C + c64[:, None], mask=tmask, other=0.0).to(tl.float32)
        ut = tl.load(u_ptr + r64[None, :] * C + c64[:, None], mask=tmask, other=0.0).to(tl.float32)
        yt = tl.clamp(zt * tl.sigmoid(zt) * ut, -448.0, 448.0)
        tl.store(qt_ptr + t_offs, yt.to(qt_ptr.dtype.element_ty), mask=t_mask)


def run(variant: str, g, u, block=(64, 64), warps=8):
    rows, cols = g.shape
    rp = -(-rows // 16) * 16
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device="cuda")
    qt = torch.full((cols, rp), 1.0, dtype=torch.float8_e4m3fn, device="cuda")  # padding must be overwritten
    grid = (triton.cdiv(rp, block[0]), triton.cdiv(cols, block[1]))
    _kernel[grid](g, u, q, qt, qt.view(torch.uint8), rows, rp, cols, VARIANT=VARIANTS[variant], BLOCK_R=block[0],
                  BLOCK_C=block[1], num_warps=warps)
    return q, qt


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    gen = torch.Generator(device="cuda").manual_seed(0)
    for block, warps in (((64, 64), 8), ((64, 64), 4), ((32, 128), 8)):
        for variant in VARIANTS:
            bad = []
            for rows, cols in ((30, 48), (64, 160), (5, 20), (128, 128), (8192, 14336)):
                g = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16() * 3
                u = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16() * 2
                q, qt = run(variant, g, u, block, warps)
                want = q.view(torch.uint8).t()
                ok = torch.equal(qt.view(torch.uint8)[:, :rows], want) and bool((qt.view(torch.uint8)[:, rows:] == 0).all())
                if not ok:
                    wrong = (qt.view(torch.uint8)[:, :rows] != want).float().mean().item()
                    bad.append(f"{rows}x{cols} ({wrong:.1%} wrong)")
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            for _ in range(20):
                run(variant, g, u, block, warps)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 20
            print(f"block {block} warps {warps} {variant:10s} {ms:.3f} ms at 8192x14336  "
                  f"{'ok' if not bad else 'WRONG: ' + ', '.join(bad)}", flush=True)


if __name__ == "__main__":
    main()
