"""``expert_grads.grads`` as one Triton kernel: a tile of rows per program, the columns in blocks.

Each program loads its rows' routing weights once, then per column block
loads ``g``, ``u``, ``g_dh``, computes the activation and its derivative in
fp32, stores ``dg``, ``du``, ``hr`` and accumulates ``h * g_dh`` for the
routing weights' gradient, stored once per row at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_experts import ACT_CODES
from .triton_launch import Launcher, cdiv, next_power_of_2


@triton.jit
def _act_and_slope(z, ACT: tl.constexpr):
    """``(act(z), act'(z))`` in fp32."""
    if ACT == 0:  # silu
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if ACT == 1:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    if ACT == 2:  # gelu (tanh); tanh(v) = 2 * sigmoid(2v) - 1
        v = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * v) - 1.0
        dv = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dv
    pos = z > 0.0
    return tl.where(pos, z, 0.0), tl.where(pos, 1.0, 0.0)


@triton.jit
def _grads(g_ptr, u_ptr, gdh_ptr, route_ptr, dg_ptr, du_ptr, hr_ptr, dr_ptr,
           rows, stride_g, stride_u, stride_gdh, stride_dg, stride_du, stride_hr,
           F: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    # F is a constexpr (a loop bound): Triton 3.5's interpreter cannot take a runtime int as a range bound
    r_offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r_offs < rows
    r64 = r_offs.to(tl.int64)[:, None]
    route = tl.load(route_ptr + r_offs, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)[None, :]
        m = r_ok[:, None] & (cols < F)
        gdh = tl.load(gdh_ptr + r64 * stride_gdh + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r64 * stride_u + cols, mask=m, other=0.0).to(tl.float32)
        dh = gdh * route
        if GATED:
            g = tl.load(g_ptr + r64 * stride_g + cols, mask=m, other=0.0).to(tl.float32)
            a, slope = _act_and_slope(g, ACT)
            h = a * u
            tl.store(dg_ptr + r64 * stride_dg + cols, (dh * u * slope).to(dg_ptr.dtype.element_ty), mask=m)
            du = dh * a
        else:
            h, slope = _act_and_slope(u, ACT)
            du = dh * slope
        tl.store(du_ptr + r64 * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(hr_ptr + r64 * stride_hr + cols, (h * route).to(hr_ptr.dtype.element_ty), mask=m)
        acc += h * gdh
    tl.store(dr_ptr + r_offs, tl.sum(acc, axis=1), mask=r_ok)


_GRADS = Launcher(_grads)


def launch(g, u, g_dh, route, activation: str, dg, du, hr) -> torch.Tensor:
    rows, F = u.shape
    for t in (g, u, g_dh, dg, du, hr):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("expert_grads: every [rows, f] operand needs unit stride along f")
    dr = torch.empty(rows, device=u.device, dtype=torch.float32)
    gated = g is not None
    block_f = min(128, next_power_of_2(F))
    block_r = 16
    grid = (cdiv(rows, block_r),)
    _GRADS(grid, g if gated else u, u, g_dh, route.contiguous(), dg if gated else du, du, hr, dr,
           rows, (g if gated else u).stride(0), u.stride(0), g_dh.stride(0), (dg if gated else du).stride(0),
           du.stride(0), hr.stride(0), F=F, GATED=gated, ACT=ACT_CODES[activation], BLOCK_R=block_r, BLOCK_F=block_f,
           num_warps=4)
    return dr
