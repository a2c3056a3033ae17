"""GPU check of sliding windows on torch's flash kernel (``passes/attention/flash_window.py``).

    python scripts/gpu_flash_window_check.py

transformers' sdpa-path sliding-window mask (``sdpa_mask`` + repeat_kv +
SDPA), bf16, compiled with kernelpytorch: asserts the site went to the flash
kernel, then compares the output and q/k/v gradients with a float32 eager
reference (the dense mask), against eager bf16's own error on the same
inputs. Exits non-zero on a mismatch. Correctness only: speed comes from bench/.
"""

from __future__ import annotations

import sys

import torch
from transformers import masking_utils as tf_masks

from kp_compiler.core.report import collect


class WindowSdpa(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  mask_function=tf_masks.sliding_window_causal_mask_function(self.window),
                                  allow_is_causal_skip=False, device=q.device)
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, v.shape[2], v.shape[3])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run(fn, inputs, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    out.float().square().sum().backward()
    return out.float(), [x.grad.float() for x in xs]


def main() -> int:
    ok = True
    for B, H, KV, S, D, W in ((2, 4, 2, 256, 64, 64), (2, 16, 4, 4096, 64, 1024), (1, 8, 8, 2048, 128, 512)):
        fn = WindowSdpa(W)
        compiled = torch.compile(fn, backend="kernelpytorch")
        for trial in range(2):
            inputs = [torch.randn(B, h, S, D, device="cuda") for h in (H, KV, KV)]
            with collect() as records:
                got, got_g = run(compiled, inputs, torch.bfloat16)
            if trial == 0:
                kinds = {k: v for r in records for p in r.passes if p.name == "attention-kernels"
                         for k, v in p.by_rule.items()}
                if kinds != {"flash-window": 1}:
                    print(f"B={B} H={H}/{KV} S={S} D={D} W={W}: attention-kernels {kinds}, not flash-window")
                    ok = False
            ref, ref_g = run(fn, inputs, torch.float32)
            eager, eager_g = run(fn, inputs, torch.bfloat16)
            err = lambda a, b: ((a - b).norm() / b.norm()).item()
            e_kp, e_eager = err(got, ref), err(eager, ref)
            g_kp = max(err(a, b) for a, b in zip(got_g, ref_g))
            g_eager = max(err(a, b) for a, b in zip(eager_g, ref_g))
            good = e_kp <= 2 * e_eager + 1e-3 and g_kp <= 2 * g_eager + 1e-3
            ok &= good
            print(f"B={B} H={H}/{KV} S={S} D={D} W={W} trial {trial}: out rel err kp {e_kp:.2e} eager bf16 "
                  f"{e_eager:.2e}; grads kp {g_kp:.2e} eager bf16 {g_eager:.2e} {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    sys.exit(main())
