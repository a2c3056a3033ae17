"""Which paired FP8 store gives torch's bytes on this GPU (issue 7 diagnostics): each ``PAIR_STORE`` variant of
``ops/triton_fp8._quantize`` on whole-tile inputs, mismatches of ``q.T`` against torch's cast of ``t.T``.
    PYTHONPATH=. python scripts/gpu_fp8_pair_debug.py
"""

import torch

from kp_compiler.ops import fp8_quant, triton_fp8

E4M3 = torch.float8_e4m3fn


def inputs():
    g = torch.Generator().manual_seed(0)
    hard = torch.randn(64, 48, generator=g) * torch.logspace(-6, 6, 64)[:, None]
    hard[5, 7] = float("inf")
    return {"64x48 randn": torch.randn(64, 48, generator=g), "64x32 randn": torch.randn(64, 32, generator=g),
            "64x64 randn": torch.randn(64, 64, generator=g), "128x48 randn": torch.randn(128, 48, generator=g),
            "64x48 hard": hard, "64x48 strided": torch.randn(128, 96, generator=g)[::2, 8:56],
            "4096x4096 bf16": torch.randn(4096, 4096, generator=g).bfloat16()}


for mode in (0, 1, 2):
    for warps, block in ((8, 64), (4, 64), (4, 32)):
        triton_fp8.CONFIG["quantize_pair"] = dict(BLOCK_R=block, BLOCK_C=block, num_warps=warps, PAIR_STORE=mode)
        for name, t in inputs().items():
            t = t.cuda()
            if t.shape[0] % block:
                continue
            q, qt, s = triton_fp8.quantize_pair(t, E4M3)
            want = fp8_quant.quantize(t.t(), s, E4M3)
            bad = (qt.view(torch.uint8) != want.view(torch.uint8)).nonzero()
            qbad = int((q.view(torch.uint8) != fp8_quant.quantize(t, s, E4M3).view(torch.uint8)).sum())
            print(f"PAIR_STORE={mode} warps={warps} block={block} {name}: q.T mismatches {len(bad)}"
                  f"{' first ' + str(bad[:6].tolist()) if len(bad) else ''}; q mismatches {qbad}", flush=True)
