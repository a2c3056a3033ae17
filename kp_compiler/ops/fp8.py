"""``kp::fp8_linear``: ``x @ w.T + b`` with both operands cast to FP8 and scaled, forward and backward.

``fp8_linear(x [*, K], w [N, K], bias [N] or None, recipe, fwd_dtype, grad_dtype)``:

- ``recipe="tensorwise"``: one scale per tensor, ``scale = amax / fp8_max``,
  taken from the current values (dynamic scaling).
- ``recipe="rowwise"``: ``x`` gets one scale per row (token), ``w`` one per
  output row, and ``grad`` one per row too.

The forward operands are cast to ``fwd_dtype`` (E4M3). In the backward, the
incoming gradient is cast to ``grad_dtype`` (E5M2). Then ``grad_x = q(g) @ q(w)``
and ``grad_w = q(g).T @ q(x)``: both backward GEMMs run in FP8 too.

Casts saturate: values are clamped to the format's largest finite value first.
A tensor (or row) whose amax is 0 gets scale 1, since any scale represents
zeros. A non-finite amax means the tensor holds inf or NaN, and the result
does too, as it would in bf16.

The implementation here is the exact emulation: quantize, dequantize to
fp32, multiply in fp32, cast to ``x``'s dtype. It is the same arithmetic a
scaled FP8 GEMM does, up to the order of its fp32 accumulation, and it runs
anywhere, so the pass, the recipes and autograd are tested on the CPU.
Device kernels (``torch._scaled_mm``) are registered by ``lowering/fp8.py``
where they have run.
"""

from __future__ import annotations

from typing import Optional

import torch

RECIPES = ("tensorwise", "rowwise")


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def scale(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """fp32 scale(s) so that ``t / scale`` spans the format: a 0-dim tensor, or ``[rows, 1]`` rowwise."""
    a = t.detach().abs().float()
    amax = a.amax(dim=-1, keepdim=True) if rowwise else a.amax()
    return torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax))


def quantize(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t / s`` cast to ``dtype``, saturating at the format's largest finite value."""
    top = fp8_max(dtype)
    return (t.float() / s).clamp(-top, top).to(dtype)


def scaled_mm(qa, sa, qb, sb, out_dtype: torch.dtype) -> torch.Tensor:
    """``(qa * sa) @ (qb * sb).T`` in fp32, cast to ``out_dtype`` (``qa [M, K]``, ``qb [N, K]``)."""
    return ((qa.float() * sa) @ (qb.float() * sb).t()).to(out_dtype)


def _forward(x2, w, bias, recipe, fwd_dtype):
    rowwise = recipe == "rowwise"
    sx, sw = scale(x2, fwd_dtype, rowwise), scale(w, fwd_dtype, rowwise)
    out = scaled_mm(quantize(x2, sx, fwd_dtype), sx, quantize(w, sw, fwd_dtype), sw, torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(x2.dtype)


def _check(x, w, bias, recipe, fwd_dtype, grad_dtype) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"kp::fp8_linear: recipe {recipe!r} is not one of {RECIPES}")
    for name, dt in (("fwd_dtype", fwd_dtype), ("grad_dtype", grad_dtype)):
        if dt.itemsize != 1 or not dt.is_floating_point:
            raise ValueError(f"kp::fp8_linear: {name} must be an FP8 dtype, got {dt}")
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or (bias is not None and bias.shape != (w.shape[0],)):
        raise ValueError(f"kp::fp8_linear: x [*, K], w [N, K], bias [N]; got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")


@torch.library.custom_op("kp::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], recipe: str,
               fwd_dtype: torch.dtype, grad_dtype: torch.dtype) -> torch.Tensor:
    _check(x, w, bias, recipe, fwd_dtype, grad_dtype)
    return _forward(x.reshape(-1, x.shape[-1]), w, bias, recipe, fwd_dtype).reshape(*x.shape[:-1], w.shape[0])


@fp8_linear.register_fake
def _(x, w, bias, recipe, fwd_dtype, grad_dtype):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("kp::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, recipe: str,
                        fwd_dtype: torch.dtype, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w)``, both GEMMs on FP8 operands (``grad`` in ``grad_dtype``)."""
    rowwise = recipe == "rowwise"
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    sg = scale(g2, grad_dtype, rowwise)
    qg = quantize(g2, sg, grad_dtype)
    # grad_x [M, K] = g [M, N] @ w [N, K]: w's scales run along N, the contraction, so rowwise
    # scaling takes w's columns (one scale per K) for this GEMM.
    wt = w.t()
    sw = scale(wt, fwd_dtype, rowwise)
    grad_x = scaled_mm(qg, sg, quantize(wt, sw, fwd_dtype), sw, x.dtype)
    # grad_w [N, K] = g.T [N, M] @ x [M, K]: contraction over tokens, scales per N and per K.
    gt, xt = g2.t(), x2.t()
    sgt, sxt = scale(gt, grad_dtype, rowwise), scale(xt, fwd_dtype, rowwise)
    grad_w = scaled_mm(quantize(gt, sgt, grad_dtype), sgt, quantize(xt, sxt, fwd_dtype), sxt, w.dtype)
    return grad_x.reshape(x.shape), grad_w


@fp8_linear_backward.register_fake
def _(grad, x, w, recipe, fwd_dtype, grad_dtype):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, bias, recipe, fwd_dtype, grad_dtype = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (recipe, fwd_dtype, grad_dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    grad_x, grad_w = torch.ops.kp.fp8_linear_backward(grad, x, w, *ctx.args)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None


fp8_linear.register_autograd(_backward, setup_context=_setup_context)
