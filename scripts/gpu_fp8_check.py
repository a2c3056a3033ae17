"""Check the FP8 kernels against the exact emulation, per recipe, forward and backward.

    PYTHONPATH=. python3 scripts/gpu_fp8_check.py                 # CUDA: kp::fp8_* ops (torch._scaled_mm)
    PYTHONPATH=. python3 scripts/gpu_fp8_check.py --smoke         # CPU, tiny: the same kernel bodies on CPU _scaled_mm

For each recipe it runs the kernel path (``ops/fp8_cuda.KERNELS``; on CUDA
through the registered ops, so the dispatch is checked too) and the
emulation (``fp8_quant.EMULATED``) on the same inputs and scales, and prints
the max abs error and the relative L2 error of the output and of both
gradients, plus each one's relative error against the bf16/fp32 product.
Exit status 1 if a kernel/emulation relative error passes ``--tol``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kp_compiler.ops import fp8, fp8_cuda, fp8_scaled, fp8_train
from kp_compiler.ops.fp8_quant import EMULATED
from kp_compiler.ops.fp8_scaled import HISTORY, SCALE

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(recipe: str, kernels, x, w, b, g, via_op: bool):
    """(out, grad_x, grad_w) through ``kernels`` (or the registered op, which dispatches by device)."""
    if recipe in ("train", "train-fast"):  # kp::fp8_linear_train, the tensorwise op of training graphs
        fast = recipe == "train-fast"  # fast accumulation in the forward GEMM (the pass's default)
        if via_op:
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = torch.ops.kp.fp8_linear_train(xr, wr, b, E4M3, E5M2, fast)[0]
            return (out, *torch.autograd.grad(out, [xr, wr], g))
        out, *saved = fp8_train.forward(kernels, x, w, b, E4M3, fast)
        return (out, *fp8_train.backward(kernels, g, *saved, E5M2, w.dtype))
    if recipe == "shared":  # kp::fp8_cast_pair + kp::fp8_linear_shared (linears that read one input)
        if via_op:
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = torch.ops.kp.fp8_linear_shared(xr, *torch.ops.kp.fp8_cast_pair(xr, E4M3), wr, b, E4M3, E5M2, False)[0]
            return (out, *torch.autograd.grad(out, [xr, wr], g))
        qx, qxt, sx = fp8_train.cast(kernels, x, E4M3)
        out, qwt, sw = fp8_train.linear(kernels, x, qx, sx, w, b, E4M3)
        return (out, *fp8_train.backward(kernels, g, qxt, qwt, sx, sw, E5M2, w.dtype))
    if recipe in fp8.RECIPES:
        if via_op:
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = torch.ops.kp.fp8_linear(xr, wr, b, recipe, E4M3, E5M2)
            return (out, *torch.autograd.grad(out, [xr, wr], g))
        return (fp8.forward(kernels, x, w, b, recipe, E4M3), *fp8.backward(kernels, g, x, w, recipe, E4M3, E5M2))
    sx = (x.abs().amax() / 448).float()
    sw = (w.abs().amax() / 448).float() if recipe == "delayed" else None
    state = torch.zeros(HISTORY + 4, device=x.device)
    state[SCALE] = (g.abs().amax() / 57344).float() if recipe == "delayed" else 0.0
    if via_op:
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = torch.ops.kp.fp8_linear_scaled(xr, wr, b, sx, sw, state, recipe, E4M3, E5M2, 0.0)
        return (out, *torch.autograd.grad(out, [xr, wr], g))
    out = fp8_scaled.forward(kernels, x, w, b, sx, sw, E4M3, False)
    return (out, *fp8_scaled.backward(kernels, g, x, w, sx, sw, state, recipe, E4M3, E5M2, 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32")
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--tol", type=float, default=2e-2, help="max relative L2 error kernel vs emulation")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    m, k, n = (40, 64, 48) if args.smoke else (args.m, args.k, args.n)
    print(f"device={device} {torch.cuda.get_device_name() if cuda else ''} torch={torch.__version__} "
          f"M={m} K={k} N={n} dtype={dtype}")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).mul(3).to(dtype)
    w = torch.randn(n, k, device=device, generator=g).div(k ** 0.5).to(dtype)
    b = torch.randn(n, device=device, generator=g).to(dtype)
    gr = torch.randn(m, n, device=device, generator=g).to(dtype)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    exact_out = torch.nn.functional.linear(xr, wr, b)
    exact = (exact_out, *torch.autograd.grad(exact_out, [xr, wr], gr))
    worst = 0.0
    for recipe in ("tensorwise", "train", "train-fast", "shared", "rowwise", "delayed", "static"):
        if recipe == "rowwise" and not cuda and not fp8_cuda.cpu_scaled_mm(rowwise=True):
            print("rowwise    skipped: this torch's CPU _scaled_mm takes per-tensor scales only")
            continue
        got = run(recipe, fp8_cuda.KERNELS, x, w, b, gr, via_op=cuda)
        again = run(recipe, fp8_cuda.KERNELS, x, w, b, gr, via_op=cuda)  # the kept kernels (ops/triton_launch.py)
        if not all(torch.equal(a, c) for a, c in zip(got, again)):
            print(f"{recipe:10s} FAIL: a second call differs from the first")
            worst = float("inf")
        want = run(recipe, EMULATED, x, w, b, gr, via_op=False)
        for name, a, e, ref in zip(("out", "grad_x", "grad_w"), got, want, exact):
            err = rel(a, e)
            worst = max(worst, err)
            print(f"{recipe:10s} {name:6s} kernel vs emulation: max abs {(a.float() - e.float()).abs().max().item():.3e}"
                  f" rel {err:.3e} | vs {dtype} product: rel {rel(a, ref):.3e}, finite {bool(torch.isfinite(a).all())}")
    if cuda:
        from kp_compiler.ops import triton_fp8

        print(f"Triton launches: amax {triton_fp8._AMAX.stats}, quantize {triton_fp8._QUANTIZE.stats}")
    ok = worst <= args.tol
    print(f"worst kernel vs emulation relative error {worst:.3e} ({'ok' if ok else 'FAIL'}, tol {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
