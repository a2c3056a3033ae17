"""GPU check of masks that read a per-row tensor (``passes/attention/data_masks.py``).

    python scripts/gpu_data_mask_check.py

transformers' sdpa padding mask (``sdpa_mask`` with a long ``attention_mask``
cast to bool, as its models do; GQA heads repeated) and its packed-sequence
mask (Llama, position ids restarting, no cache), bf16, compiled with
kernelpytorch under ``attention_kernel="flex"`` (the default keeps SDPA for
these masks: flex measured slower for padding): asserts the sites went to flex, then compares the output and
gradients with a float32 eager reference against eager bf16's own error, on
fresh paddings and documents each trial. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch
from transformers import masking_utils as tf_masks

from kp_compiler.core.report import collect
from kp_compiler.testing import hf


class PaddedSdpa(torch.nn.Module):
    def forward(self, q, k, v, padding):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  attention_mask=padding.to(torch.bool), allow_is_causal_skip=False, device=q.device)
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, v.shape[2], v.shape[3])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def err(a, b):
    a, b = a.float(), b.float()
    keep = torch.isfinite(b)
    return ((a - b)[keep].norm() / b[keep].norm()).item()


def kernels(records):
    return {k: v for r in records for p in r.passes if p.name == "attention-kernels" for k, v in p.by_rule.items()}


def check_padded() -> bool:
    ok = True
    B, H, KV, S, D = 2, 16, 4, 4096, 64
    fn = PaddedSdpa()
    compiled = torch.compile(fn, backend="kernelpytorch", options={"attention_kernel": "flex"})
    for trial in range(3):
        lead = torch.randint(1, S // 2, (B,))
        padding = (torch.arange(S)[None] >= lead[:, None]).long().cuda()
        qkv = [torch.randn(B, h, S, D, device="cuda") for h in (H, KV, KV)]
        runs = {}
        for name, f, dtype in (("kp", compiled, torch.bfloat16), ("ref", fn, torch.float32),
                               ("eager", fn, torch.bfloat16)):
            xs = [x.detach().to(dtype).requires_grad_() for x in qkv]
            with collect() as records:
                out = f(*xs, padding)
            out.float().square().sum().backward()
            runs[name] = (out, [x.grad for x in xs], records)
        if trial == 0 and kernels(runs["kp"][2]) != {"flex": 1}:
            print(f"padded: attention-kernels {kernels(runs['kp'][2])}, not flex")
            ok = False
        nan = runs["kp"][0].isnan().any().item(), runs["eager"][0].isnan().any().item()
        e_kp, e_eager = err(runs["kp"][0], runs["ref"][0]), err(runs["eager"][0], runs["ref"][0])
        g_kp = max(err(a, b) for a, b in zip(runs["kp"][1], runs["ref"][1]))
        g_eager = max(err(a, b) for a, b in zip(runs["eager"][1], runs["ref"][1]))
        good = e_kp <= 2 * e_eager + 1e-3 and g_kp <= 2 * g_eager + 1e-3 and nan[0] == nan[1]
        ok &= good
        print(f"padded B={B} H={H}/{KV} S={S} D={D} leads {lead.tolist()}: out err kp {e_kp:.2e} eager bf16 "
              f"{e_eager:.2e}; grads kp {g_kp:.2e} eager {g_eager:.2e}; NaN kp/eager {nan} {'ok' if good else 'MISMATCH'}")
    return ok


def check_packed() -> bool:
    ok = True
    import copy

    model, vocab = hf.build("llama3", "suite", attn="sdpa")
    ref_model = copy.deepcopy(model).cuda().float()
    model = model.cuda().to(torch.bfloat16)
    logits = lambda m, ids, pos: m(input_ids=ids, position_ids=pos, use_cache=False).logits
    compiled = torch.compile(lambda ids, pos: logits(model, ids, pos), backend="kernelpytorch",
                             options={"attention_kernel": "flex"})
    for trial, docs in enumerate(((300, 200, 524), (1000, 24), (512, 512))):
        ids = torch.randint(0, vocab, (2, 1024), device="cuda")
        pos = torch.cat([torch.arange(n) for n in docs])[None].expand(2, 1024).contiguous().cuda()
        with torch.no_grad():
            with collect() as records:
                got = compiled(ids, pos)
            eager = logits(model, ids, pos)
            ref = logits(ref_model, ids, pos)
        if trial == 0 and kernels(records) != {"flex": 4}:
            print(f"packed: attention-kernels {kernels(records)}, not flex x4")
            ok = False
        e_kp, e_eager = err(got, ref), err(eager, ref)
        good = e_kp <= 2 * e_eager + 1e-3
        ok &= good
        print(f"packed llama3 suite docs {docs}: logits err kp {e_kp:.2e} eager bf16 {e_eager:.2e} "
              f"{'ok' if good else 'MISMATCH'}")
    return ok


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    results = [check_padded(), check_packed()]
    sys.exit(0 if all(results) else 1)
