"""Lifting additive biases (ALiBi) into FlexAttention score_mods, proven on the grid."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from bench.cases import attention as cases
from kp_compiler.passes.attention import match as attention
from kp_compiler.passes.attention.score_mod import describe_bias, lift_score_bias

L, H = 32, 4


def bias_node(fn, dtype=torch.float32, batch=1):
    inputs = [torch.randn(batch, H, L, 8, dtype=dtype) for _ in range(3)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        gm = make_fx(fn, pre_dispatch=True)(*[mode.from_tensor(t) for t in inputs])
    (softmax,) = [n for n in gm.graph.nodes if n.target in attention.SOFTMAX]
    att = attention.match(softmax)
    return att.bias


def alibi_dense(dtype):
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, H + 1) / H)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return (-slopes[:, None, None] * (i - j).clamp(min=0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alibi_lifts_to_a_per_head_bias(dtype):
    bias_fn = lift_score_bias(bias_node(cases.alibi, dtype), L, L)
    assert bias_fn is not None
    h, q, kv = torch.arange(H)[:, None, None], torch.arange(L)[:, None], torch.arange(L)[None, :]
    torch.testing.assert_close(bias_fn(0, h, q, kv).float(), alibi_dense(dtype).float(), rtol=1e-2, atol=1e-2)
    assert "h" in describe_bias(bias_fn) and "clamp(q_idx - kv_idx, 0, None)" in describe_bias(bias_fn)


def test_symbolic_lengths_are_not_lifted():
    assert lift_score_bias(bias_node(cases.alibi), None, L) is None


def bias_from_input(q, k, v):
    bias = q.mean(-1, keepdim=True)  # reads data
    return cases.naive(q, k, v, bias=bias)


def bias_over_batch(q, k, v):
    b = torch.arange(q.shape[0])[:, None, None, None].float()
    return cases.naive(q, k, v, bias=b * torch.arange(L)[None, :].float())


@pytest.mark.parametrize("fn", [bias_from_input, bias_over_batch])
def test_biases_that_read_data_or_vary_over_batch_are_not_lifted(fn):
    node = bias_node(fn, batch=2)
    assert node is not None and lift_score_bias(node, L, L) is None


def test_alibi_through_the_backend_trains_on_sdpa_on_the_cpu():
    """Training on the CPU: no flex backward there, the combined mask goes to SDPA; gradients equal."""
    inputs = [torch.randn(1, H, L, 8, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(cases.alibi, backend="kernelpytorch", options={"attention_kernel": "flex"})
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    out, ref = compiled(*inputs), cases.alibi(*ref_in)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip(inputs, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert not math.isnan(out.sum().item())
