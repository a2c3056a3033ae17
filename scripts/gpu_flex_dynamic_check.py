"""GPU check of FlexAttention with symbolic lengths (``ops/block_masks.py``, ``passes/attention/flex.py``).

    python scripts/gpu_flex_dynamic_check.py

Two workloads compiled with ``dynamic=True`` and the default options (on CUDA
the kernel table takes flex for structured masks):

- transformers' sdpa sliding-window mask (``sdpa_mask`` with
  ``sliding_window_causal_mask_function(1024)``, GQA heads repeated), bf16,
  lengths 4096, 3072, 2048 (and 200, which has two blocks);
- transformers' Mistral (tiny config, window 16, sdpa path) as a training
  step at lengths 136, 200, 264.

For each: one compile, the flex sites counted, outputs and gradients against
a float32 eager reference compared with eager bf16's own error (at most 2x
plus a small floor). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch
from transformers import masking_utils as tf_masks

from kp_compiler.core.report import collect
from kp_compiler.testing import hf


class WindowSdpa(torch.nn.Module):
    def forward(self, q, k, v):
        mask = tf_masks.sdpa_mask(batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2],
                                  mask_function=tf_masks.sliding_window_causal_mask_function(1024),
                                  allow_is_causal_skip=False, device=q.device)
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, v.shape[2], v.shape[3])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def flex_sites(records):
    return sum(p.by_rule.get("flex", 0) for r in records for p in r.passes if p.name == "attention-kernels")


def close(name, got, ref, eager) -> bool:
    e_got, e_eager = err(got, ref), err(eager, ref)
    ok = e_got <= 2 * e_eager + 1e-3
    print(f"  {name}: kernelpytorch {e_got:.2e}, eager bf16 {e_eager:.2e} {'ok' if ok else 'MISMATCH'}")
    return ok


def check_window() -> bool:
    ok = True
    fn = WindowSdpa()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for S in (4096, 3072, 2048, 200):
            qkv = [torch.randn(2, h, S, 128, device="cuda") for h in (16, 4, 4)]
            runs = {}
            for name, f, dtype in (("kp", compiled, torch.bfloat16), ("ref", fn, torch.float32),
                                   ("eager", fn, torch.bfloat16)):
                xs = [x.detach().to(dtype).requires_grad_() for x in qkv]
                out = f(*xs)
                out.float().square().sum().backward()
                runs[name] = (out, [x.grad for x in xs])
            print(f"window S={S}")
            ok &= close("out", runs["kp"][0], runs["ref"][0], runs["eager"][0])
            for i, n in enumerate("qkv"):
                ok &= close(f"d{n}", runs["kp"][1][i], runs["ref"][1][i], runs["eager"][1][i])
    print(f"window: {len(records)} compile(s), {flex_sites(records)} flex site(s)")
    return ok and len(records) == 1 and flex_sites(records) == 1


def check_mistral_train() -> bool:
    ok = True
    model, vocab = hf.build("mistral", "tiny", attn="sdpa")
    model = model.cuda().train()
    ref_model = hf.build("mistral", "tiny", attn="sdpa")[0].cuda().train()
    ref_model.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    step = torch.compile(lambda ids: model(ids, labels=ids).loss, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for T in (136, 200, 264):
            ids = torch.randint(0, vocab, (2, T), device="cuda")
            runs = {}
            for name, m, f, dtype in (("kp", model, step, torch.bfloat16), ("ref", ref_model, None, torch.float32),
                                      ("eager", ref_model, None, torch.bfloat16)):
                m.to(dtype).zero_grad(set_to_none=True)
                loss = f(ids) if f is not None else m(ids, labels=ids).loss
                loss.backward()
                runs[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
            print(f"mistral T={T}: loss kp {runs['kp'][0].item():.4f} ref {runs['ref'][0].item():.4f}")
            ok &= close("loss", runs["kp"][0], runs["ref"][0], runs["eager"][0])
            for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                      "model.embed_tokens.weight"):
                g = [runs[k][1][n] for k in ("kp", "ref", "eager")]
                if any(x is None for x in g):
                    print(f"  {n}: a gradient is None {[x is None for x in g]}")
                    ok = False
                    continue
                ok &= close(n, *g)
    print(f"mistral: {len(records)} compile(s), {flex_sites(records)} flex site(s)")
    return ok and len(records) == 1 and flex_sites(records) >= model.config.num_hidden_layers


if __name__ == "__main__":
    results = {"window": check_window(), "mistral-train": check_mistral_train()}
    print(results)
    sys.exit(0 if all(results.values()) else 1)
