"""attention-to-sdpa: spellings rewritten (outputs and gradients equal eager), negatives untouched."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from bench.cases import attention as cases
from kp_compiler.passes.attention.match import attention_to_sdpa
from kp_compiler.testing.compare import assert_same_grads, grads_of
from tests.utils import compile_and_collect

aten = torch.ops.aten
B, H, L, D = 2, 4, 16, 8


def qkv(heads_kv=H, dim=4, dtype=torch.float32):
    shape = (B, H, L, D) if dim == 4 else (B * H, L, D)
    kv_shape = (B, heads_kv, L, D) if dim == 4 else shape
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in (shape, kv_shape, kv_shape)]


def canonical(fn, inputs):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return make_fx(fn, pre_dispatch=True)(*[mode.from_tensor(t.detach()) for t in inputs])


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


def scaled(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(D)), dim=-1) @ v


def q_scaled(q, k, v):
    return torch.softmax((q * D ** -0.5) @ k.transpose(-1, -2), -1) @ v


def qk_scaled(q, k, v):
    s = D ** -0.25
    return torch.matmul(torch.softmax(torch.matmul(q * s, (k * s).transpose(2, 3)), dim=-1), v)


def bmm_3d(q, k, v):
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D), dim=-1), v)


def einsum_spelled(q, k, v):
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(w, -1), v)


def upcast(q, k, v):
    w = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def upcast_float(q, k, v):
    w = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)
    return torch.softmax(w, dim=-1).to(q.dtype) @ v


def additive_mask(q, k, v):
    pad = torch.zeros(B, 1, 1, L, dtype=q.dtype)
    pad[:, :, :, -3:] = float("-inf")
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + pad, -1) @ v


def bool_padding_mask(q, k, v):
    keep = torch.arange(L)[None, None, None, :] < L - 3
    return torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~keep, float("-inf")), -1) @ v


def inplace_div_scale(q, k, v):
    """Falcon's spelling: the scores scaled in place (``/=`` on a fresh matmul result)."""
    s = q @ k.transpose(-2, -1)
    s /= math.sqrt(D)
    return torch.softmax(s, -1) @ v


def inplace_mul_scale(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1))
    s.mul_(0.125)
    return torch.softmax(s, -1) @ v


def tril_ones(q, k, v):
    keep = torch.tril(torch.ones(L, L)).bool()
    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")), -1) @ v


def dropout_off(q, k, v):
    return F.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), p=0.1, training=False) @ v


SPELLINGS = {
    "div-scale": (cases.plain, {"no-mask": 1}),
    "mul-scale": (scaled, {"no-mask": 1}),
    "scale-on-q": (q_scaled, {"no-mask": 1}),
    "scale-on-q-and-k": (qk_scaled, {"no-mask": 1}),
    "causal-arange": (cases.causal, {"causal": 1}),
    "causal-tril-ones": (tril_ones, {"causal": 1}),
    "sliding-window": (cases.make_sliding_window(4), {"mask-tensor": 1}),
    "documents": (cases.make_documents(4), {"mask-tensor": 1}),
    "alibi": (cases.alibi, {"mask-tensor": 1}),
    "additive-mask": (additive_mask, {"mask-tensor": 1}),
    "bool-padding-mask": (bool_padding_mask, {"mask-tensor": 1}),
    "softmax-dtype-upcast": (upcast, {"no-mask": 1}),
    "float-upcast": (upcast_float, {"no-mask": 1}),
    "dropout-in-eval": (dropout_off, {"no-mask": 1}),
    "inplace-div-scale": (inplace_div_scale, {"no-mask": 1}),
    "inplace-mul-scale": (inplace_mul_scale, {"no-mask": 1}),
    "einsum": (einsum_spelled, {"no-mask": 1}),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_rewritten_and_equal(name):
    fn, kinds = SPELLINGS[name]
    inputs = qkv()
    gm = canonical(fn, inputs)
    result = attention_to_sdpa(gm)
    assert {k: v for k, v in result.by_rule.items() if v} == kinds
    assert len(sdpa_nodes(gm)) == 1
    assert not [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._softmax.default)]
    check_grads(fn, gm, inputs)


def repeat_kv(h, n):
    b, kvh, s, d = h.shape
    return h[:, :, None, :, :].expand(b, kvh, n, s, d).reshape(b, kvh * n, s, d)


def hf_gqa_causal(q, k, v):
    return cases.causal(q, repeat_kv(k, 2), repeat_kv(v, 2))


def gqa_with_bias(q, k, v):
    return additive_mask(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("fn, dim, heads_kv, gqa", [
    (bmm_3d, 3, H, False),
    (cases.gqa_causal, 4, H // 2, True),
    (hf_gqa_causal, 4, H // 2, True),
    (gqa_with_bias, 4, H // 2, False),  # a mask tensor: keep k, v repeated (no GQA in that kernel)
])
def test_layouts(fn, dim, heads_kv, gqa):
    inputs = qkv(heads_kv=heads_kv, dim=dim)
    gm = canonical(fn, inputs)
    assert attention_to_sdpa(gm) == 1
    (node,) = sdpa_nodes(gm)
    assert node.kwargs.get("enable_gqa", False) is gqa
    if gqa:
        assert [a.name for a in node.args[1:]] == ["k_1", "v_1"], "the unrepeated k and v"
    check_grads(fn, gm, inputs)


def test_einsum_lookalikes_untouched():
    """An einsum that is not q k^T (here q k without the transpose) is not attention."""
    def fn(q, k, v):
        w = torch.einsum("bhqd,bhdk->bhqk", q, k.transpose(-2, -1).contiguous())
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(w, -1), v)

    inputs = qkv()
    gm = canonical(fn, inputs)
    assert attention_to_sdpa(gm) == 0


def check_grads(fn, gm, inputs, rtol=1e-5, atol=1e-5):
    fresh = [torch.randn_like(t) for t in inputs]
    a = [t.clone().requires_grad_() for t in fresh]
    b = [t.clone().requires_grad_() for t in fresh]
    ref, got = fn(*a), gm(*b)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    ref.backward(g)
    got.backward(g)
    assert_same_grads(grads_of(enumerate(b)), grads_of(enumerate(a)), rtol=rtol, atol=atol)


def weights_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1), -1)
    return p @ v, p


def softmax_other_dim(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def scale_after_bias(q, k, v):
    bias = torch.randn(L, L)
    return torch.softmax((q @ k.transpose(-2, -1) + bias) * 0.5, -1) @ v


def soft_penalty_fill(q, k, v):
    keep = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    s = (q @ k.transpose(-2, -1)).masked_fill(~keep, -10.0)  # a soft penalty, not a mask
    return torch.softmax(s, -1) @ v


def truncating_cast(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1) * 4).int().float(), -1) @ v


def weights_mixed(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1), -1)
    return p @ v + p.sum()


@pytest.mark.parametrize("fn", [weights_returned, softmax_other_dim, scale_after_bias, soft_penalty_fill, weights_mixed,
                                truncating_cast])
def test_negative_cases_untouched(fn):
    inputs = qkv()
    gm = canonical(fn, inputs)
    before = [n.target for n in gm.graph.nodes]
    assert attention_to_sdpa(gm) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_mixed_dtypes_untouched():
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), -1).float() @ v.float()

    inputs = [torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3)]
    gm = canonical(fn, inputs)
    assert attention_to_sdpa(gm) == 0


def test_through_the_backend_dump_shows_is_causal(tmp_path):
    inputs = qkv()
    compiled, out, records = compile_and_collect(cases.causal, inputs, dump_dir=str(tmp_path))
    torch.testing.assert_close(out, cases.causal(*inputs), rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.matches == 1 and rec.by_rule == {"causal": 1}
    text = (tmp_path / "graph-000" / "02-attention-to-sdpa.txt").read_text()
    from tests.utils import filecheck

    filecheck(
        "CHECK: aten.scaled_dot_product_attention.default(%l_q_, %l_k_, %l_v_, attn_mask=None, "
        "dropout_p=0.0, is_causal=True, scale=0.35355\n"
        "CHECK-NOT: softmax\nCHECK-NOT: arange\n",
        text,
    )


def test_active_dropout_moves_into_sdpa_and_stays_unbiased():
    """Dropout in training cannot match eager bit for bit: check it statistically.

    Both eager dropout and SDPA's dropout_p are unbiased, so the mean over many
    draws converges to the dropout-free output; compare within 6 standard errors.
    """
    def fn(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), p=0.3, training=True) @ v

    inputs = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    gm = canonical(fn, inputs)
    assert attention_to_sdpa(gm) == 1
    (node,) = sdpa_nodes(gm)
    assert node.kwargs["dropout_p"] == 0.3
    q, k, v = inputs
    exact = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
    draws = torch.stack([gm(q, k, v) for _ in range(2000)])
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() <= 6 * stderr + 1e-6).all()
    assert draws.std(0).mean() > 0.01, "dropout must actually be applied"


def _inductor_patterns():
    """Every ``_sfdp_pattern_N`` that Inductor's fuse_attention.py defines in the installed torch."""
    import inspect

    from torch._inductor.fx_passes import fuse_attention

    found = sorted((int(n.rsplit("_", 1)[1]), fn) for n, fn in vars(fuse_attention).items()
                   if n.startswith("_sfdp_pattern_") and n.rsplit("_", 1)[1].isdigit())
    return [(n, fn, inspect.getsource(fn)) for n, fn in found]


INDUCTOR_PATTERNS = _inductor_patterns()
NOT_YET: set = set()  # patterns known not to be matched yet


def _pattern_args(fn, src: str):
    import inspect

    dtype = torch.float16 if "float16" in src or "torch.half" in src else torch.float32
    permuted = "permute([0, 2, 1, 3])" in src or "permute(0, 2, 1, 3)" in src
    three_d = "torch.bmm(query" in src
    shape = (B, L, H, D) if permuted else (B * H, L, D) if three_d else (B, H, L, D)
    tensors, consts = [], {}
    for name in inspect.signature(fn).parameters:
        if name in ("query", "key", "value"):
            tensors.append((name, torch.randn(shape, dtype=dtype)))
        elif name in ("attn_mask", "attention_mask"):
            if "attn_mask == 0" in src:
                m = torch.ones(B, L, dtype=dtype)
                m[:, -2:] = 0
            else:
                m = torch.randn((B, 1, L, L) if name == "attention_mask" else (B, 1, 1, L), dtype=dtype)
            tensors.append((name, m))
        elif name == "causal_mask":
            tensors.append((name, torch.ones(1, 1, L, L, dtype=torch.bool).tril()))
        elif name == "dropout_p":
            consts[name] = 0.0
        else:  # inv_scale, scale_factor, inv_scale_factor
            consts[name] = 2.0
    return tensors, consts, dtype


@pytest.mark.parametrize("num, fn, src", INDUCTOR_PATTERNS, ids=[f"sfdp-{n}" for n, _, _ in INDUCTOR_PATTERNS])
def test_every_inductor_fuse_attention_pattern(num, fn, src):
    tensors, consts, dtype = _pattern_args(fn, src)
    names = [n for n, _ in tensors]

    def call(*ts):
        return fn(**dict(zip(names, ts)), **consts)

    inputs = [t for _, t in tensors]
    gm = canonical(call, inputs)
    matched = attention_to_sdpa(gm)
    if num in NOT_YET:
        assert matched == 0
        return
    assert matched == 1, f"pattern {num} not rewritten"
    assert not [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._safe_softmax.default)]
    tol = 1e-2 if dtype == torch.float16 else 1e-5  # fp16 eager rounds its own intermediates
    fresh = [torch.randn_like(t) if t.is_floating_point() and n in ("query", "key", "value") else t
             for n, t in tensors]
    want, got = call(*fresh), gm(*fresh)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _block_and_input():
    from kp_compiler.testing.models import Block

    return Block(d=32, heads=4, max_len=16), torch.randn(2, 8, 32)


def test_tril_buffer_is_causal_under_a_runtime_guard():
    """nanoGPT's registered tril buffer, sliced [:T, :T], with constant_buffers: is_causal while it is unchanged."""
    model, x = _block_and_input()
    compiled, out, records = compile_and_collect(model, (x,), lowering="eager", constant_buffers=True)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.by_rule == {"causal": 1}
    assert len(records[0].guards) == 1 and "lower triangle" in records[0].guards[0]["reason"]

    # The user changes the buffer in place (here: no masking at all): the guard fails,
    # the unrewritten graph runs, and results follow the new buffer.
    with torch.no_grad():
        model.attn.bias.fill_(1.0)
    with pytest.warns(RuntimeWarning, match="an input changed since compile time"):
        got = compiled(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert any("changed since compile time" in f for f in records[0].fallbacks)


def test_tril_buffer_guard_fallback_in_training():
    model, x = _block_and_input()
    xa = x.clone().requires_grad_()
    compiled, out, records = compile_and_collect(model, (xa,), constant_buffers=True)
    assert records[0].guards
    with torch.no_grad():
        model.attn.bias.fill_(1.0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="an input changed since compile time"):
        got = compiled(xa)
    want = model(xb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_tril_buffer_is_not_relied_on_by_default():
    """Issue 14: a write through .data (no version bump) left the compiled model causal (0.19 rel. error).
    By default the buffer stays a mask read on every call, and the report says how to opt in."""
    model, x = _block_and_input()
    compiled, out, records = compile_and_collect(model, (x,), lowering="eager")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert "causal" not in rec.by_rule and not records[0].guards
    assert any("constant_buffers" in n for n in rec.notes)
    model.attn.bias.data.fill_(1.0)  # seen: the mask is read on every call
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_buffer_that_is_not_a_triangle_is_not_claimed_causal():
    model, x = _block_and_input()
    with torch.no_grad():
        model.attn.bias[..., 3, 1] = 0.0  # a hole: not a lower triangle any more
    compiled, out, records = compile_and_collect(model, (x,), lowering="eager")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.by_rule == {"mask-tensor": 1}
    assert records[0].guards == []


def test_guarded_rewrite_survives_verify():
    """verify keeps guarded inputs at their example values (the rewrite is claimed only for those)."""
    model, x = _block_and_input()
    compiled, out, records = compile_and_collect(model, (x,), verify=True, constant_buffers=True)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.status == "ok" and rec.by_rule == {"causal": 1}
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_dynamic_sequence_length_stays_causal():
    """With a symbolic sequence length the arange-built mask is still proven causal."""
    from kp_compiler.core.report import collect

    compiled = torch.compile(cases.causal, backend="kernelpytorch", dynamic=True)
    with collect() as records:
        for seq in (8, 12, 20):
            q, k, v = (torch.randn(2, 4, seq, 16) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), cases.causal(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(records) == 1
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.by_rule == {"causal": 1}


def test_a_slice_to_a_symbolic_length_is_not_a_crash_in_the_pass():
    """With dynamic shapes nanoGPT's buffer is sliced to a symbolic T (an fx.Node end): the mask lift
    compared that node with an int and the pass was rolled back with a TypeError."""
    from kp_compiler.core.report import collect

    model, x = _block_and_input()
    compiled = torch.compile(model, backend="kernelpytorch", options={"lowering": "eager"}, dynamic=True)
    with collect() as records:
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.status == "ok", rec.reason


@pytest.mark.parametrize("T", [16, 8], ids=["full-length", "shorter"])
def test_tril_buffer_at_full_length_is_causal(T):
    """Issue 16: ``bias[:, :, :T, :T]`` with ``T == block_size`` canonicalizes to ``aten.alias`` of the
    whole buffer, not a slice; it is the same causal mask as at ``T < block_size``."""
    from kp_compiler.testing.models import Block

    model, x = Block(d=32, heads=4, max_len=16), torch.randn(2, T, 32)
    compiled, out, records = compile_and_collect(model, (x,), constant_buffers=True)
    (rec,) = [p for p in records[0].passes if p.name == "attention-to-sdpa"]
    assert rec.by_rule == {"causal": 1}
    assert len(records[0].guards) == 1
    xa, xb = torch.randn(2, T, 32, requires_grad=True), None
    xb = xa.detach().clone().requires_grad_()
    got, want = compiled(xa), model(xb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_in_place_scaling_of_scores_read_elsewhere_is_left_alone():
    """The scores are also read before the in-place scaling: SDPA would not reproduce that reader's value."""
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        total = s.sum()
        s.div_(2.0)
        return torch.softmax(s, -1) @ v, total

    inputs = qkv()
    gm = canonical(fn, inputs)
    assert attention_to_sdpa(gm) == 0
    fresh = [torch.randn_like(t) for t in inputs]
    for a, b in zip(gm(*fresh), fn(*fresh)):
        torch.testing.assert_close(a, b)
