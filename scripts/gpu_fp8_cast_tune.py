"""Time the FP8 cast kernels (``ops/triton_fp8.py``) under other tiles and warp counts (issue 7 diagnostics).

For the tensors a Llama-8B-dims training step casts (bf16 ``[4096, 4096]``,
``[4096, 14336]``, ``[14336, 4096]``): the amax kernel and the paired
quantize kernel (``q`` and ``q.T``) under each candidate of ``CONFIG``,
GPU time per call (``bench.timing.time_fn``, launch hidden) and the bandwidth it reaches (bytes read
and written), checked byte for byte against the current configuration.
    PYTHONPATH=. python scripts/gpu_fp8_cast_tune.py
"""


import torch

from bench.timing import time_fn
from kp_compiler.ops import triton_fp8

E4M3 = torch.float8_e4m3fn
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))


def gpu_ms(fn, reps=30):
    return time_fn(fn, "cuda", reps, hide_launch=True).median_ms


def same(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.dtype == E4M3 else x, y.view(torch.uint8) if y.dtype == E4M3 else y)
               for x, y in zip(a, b))


def main():
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; default {triton_fp8.CONFIG}, "
          f"EXACT_ROUND={triton_fp8.EXACT_ROUND}")
    default = {k: dict(v) for k, v in triton_fp8.CONFIG.items()}
    for r, c in SHAPES:
        t = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        n = t.numel()
        s = torch.tensor(0.01, device="cuda")
        want_m = triton_fp8.amax(t, False)
        want = triton_fp8.quantize_pair(t, E4M3, s)
        for br, bc, tiles, nw in ((64, 64, 8, 4), (32, 128, 4, 8), (64, 128, 1, 8), (128, 256, 4, 8), (32, 256, 1, 8)):
            triton_fp8.CONFIG["amax"] = dict(BLOCK_R=br, BLOCK_C=bc, TILES=tiles, num_warps=nw)
            ok = torch.equal(triton_fp8.amax(t, False), want_m)
            ms = gpu_ms(lambda: triton_fp8.amax(t, False))
            print(f"[{r}x{c}] amax BLOCK_R={br} BLOCK_C={bc} TILES={tiles} warps={nw}: {ms * 1e3:.1f} us, "
                  f"{2 * n / ms / 1e6:.0f} GB/s{'' if ok else ' WRONG'}", flush=True)
        triton_fp8.CONFIG["amax"] = default["amax"]
        for exact in (False, True):
            triton_fp8.EXACT_ROUND = exact
            for br, bc, nw in ((64, 64, 4), (64, 64, 8), (32, 128, 4), (128, 64, 8), (128, 128, 8), (64, 256, 8)):
                triton_fp8.CONFIG["quantize"] = triton_fp8.CONFIG["quantize_pair"] = dict(BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
                ok = same(triton_fp8.quantize_pair(t, E4M3, s), want)
                pair = gpu_ms(lambda: triton_fp8.quantize_pair(t, E4M3, s))
                one = gpu_ms(lambda: triton_fp8.quantize(t, s, E4M3))
                print(f"[{r}x{c}] exact_round={exact} BLOCK_R={br} BLOCK_C={bc} warps={nw}: quantize_pair {pair * 1e3:.1f} us "
                      f"({4 * n / pair / 1e6:.0f} GB/s), quantize {one * 1e3:.1f} us ({3 * n / one / 1e6:.0f} GB/s)"
                      f"{'' if ok else ' WRONG'}", flush=True)
        triton_fp8.CONFIG["quantize"], triton_fp8.CONFIG["quantize_pair"] = default["quantize"], default["quantize_pair"]
        triton_fp8.EXACT_ROUND = False
        del t
    print(f"launches: amax {triton_fp8._AMAX.stats}, quantize {triton_fp8._QUANTIZE.stats}")


if __name__ == "__main__":
    main()
