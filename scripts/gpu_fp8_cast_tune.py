"""Time the FP8 cast kernels (``ops/triton_fp8.py``) under other tiles and warp counts (issue 7 diagnostics).

For the tensors a Llama-8B-dims training step casts (bf16 ``[4096, 4096]``,
``[4096, 14336]``, ``[14336, 4096]``): the amax kernel and the paired
quantize kernel (``q`` and ``q.T``) under each candidate of ``CONFIG``,
GPU time over back-to-back calls and the bandwidth it reaches (bytes read
and written), checked byte for byte against the current configuration.
    PYTHONPATH=. python scripts/gpu_fp8_cast_tune.py
"""

import itertools

import torch

from kp_compiler.ops import triton_fp8

E4M3 = torch.float8_e4m3fn
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))


def gpu_ms(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def main():
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; default {triton_fp8.CONFIG}")
    default = {k: dict(v) for k, v in triton_fp8.CONFIG.items()}
    for r, c in SHAPES:
        t = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        n = t.numel()
        want_m = triton_fp8.amax(t, False)
        want = triton_fp8.quantize_pair(t, E4M3)
        for br, bc, tiles, nw in itertools.product((32, 64, 128), (64, 128, 256), (1, 4, 8), (4, 8)):
            triton_fp8.CONFIG["amax"] = dict(BLOCK_R=br, BLOCK_C=bc, TILES=tiles, num_warps=nw)
            if not torch.equal(triton_fp8.amax(t, False), want_m):
                print(f"[{r}x{c}] amax {triton_fp8.CONFIG['amax']}: WRONG")
                continue
            ms = gpu_ms(lambda: triton_fp8.amax(t, False))
            print(f"[{r}x{c}] amax BLOCK_R={br} BLOCK_C={bc} TILES={tiles} warps={nw}: {ms * 1e3:.1f} us, "
                  f"{2 * n / ms / 1e9:.0f} GB/s", flush=True)
        triton_fp8.CONFIG["amax"] = default["amax"]
        for br, bc, nw in itertools.product((32, 64, 128), (32, 64, 128, 256), (4, 8)):
            triton_fp8.CONFIG["quantize"] = dict(BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
            got = triton_fp8.quantize_pair(t, E4M3)
            if not all(torch.equal(g.view(torch.uint8) if g.dtype == E4M3 else g, w.view(torch.uint8) if w.dtype == E4M3 else w)
                       for g, w in zip(got, want)):
                print(f"[{r}x{c}] quantize_pair {triton_fp8.CONFIG['quantize']}: WRONG")
                continue
            ms = gpu_ms(lambda: triton_fp8.quantize_pair(t, E4M3))
            print(f"[{r}x{c}] quantize_pair BLOCK_R={br} BLOCK_C={bc} warps={nw}: {ms * 1e3:.1f} us (with its amax), "
                  f"{4 * n / ms / 1e9:.0f} GB/s of the pair's bytes", flush=True)
        triton_fp8.CONFIG["quantize"] = default["quantize"]
        del t


if __name__ == "__main__":
    main()
