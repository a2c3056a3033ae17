"""Where the paired FP8 store (``ops/triton_fp8._quantize`` with ``TRANSPOSED``) gives torch's bytes on this GPU
(issue 7 diagnostics): input dtypes and layouts, whole and partial row tiles, mismatches of ``q.T`` against
torch's cast of ``t.T``, through ``_launch`` directly (the fallback of ``quantize_pair`` bypassed).
    PYTHONPATH=. python scripts/gpu_fp8_pair_debug.py
"""

import torch

from kp_compiler.ops import fp8_quant, triton_fp8

E4M3 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU under TRITON_INTERPRET=1
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for rows, cols, layout in ((64, 48, "row-major"), (64, 64, "row-major"), (128, 96, "row-major"), (37, 48, "row-major"),
                               (80, 32, "row-major"), (64, 48, "transposed view"), (4096, 4096, "row-major")):
        base = torch.randn(rows, cols, generator=g) if layout == "row-major" else torch.randn(cols, rows, generator=g).t()
        t = base.to(dtype).to(DEVICE)
        s = (fp8_quant.amax(t, False) / 448).reshape(())
        q, qt = triton_fp8._launch(t, E4M3, s, None, False, transposed=True)
        want = fp8_quant.quantize(t.t(), s, E4M3)
        bad = (qt.view(torch.uint8) != want.view(torch.uint8)).nonzero()
        qbad = int((q.view(torch.uint8) != fp8_quant.quantize(t, s, E4M3).view(torch.uint8)).sum())
        print(f"{str(dtype):15s} {rows}x{cols} {layout} strides {t.stride()}: q.T mismatches {len(bad)}"
              f"{' first ' + str(bad[:4].tolist()) if len(bad) else ''}; q mismatches {qbad}", flush=True)
