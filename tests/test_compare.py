"""The numerics helpers the tests, the zoo and the bench share: a lost gradient is a failure."""

import pytest
import torch

from bench import report
from kp_compiler.testing.compare import assert_same_grads, grad_error, grads_of, missing_grads


def test_grads_of_keeps_none():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    (a * 2).sum().backward()
    got = grads_of([("a", a), ("b", b)])
    assert got["b"] is None and torch.equal(got["a"], torch.full((2,), 2.0))


def test_a_gradient_missing_on_one_side_fails_everywhere():
    ref = {"w": torch.randn(3), "v": torch.randn(3), "frozen": None}
    got = {"w": ref["w"].clone(), "v": None, "frozen": None}
    assert missing_grads(got, ref) == ["v"]
    assert grad_error(got, ref) == float("inf")
    with pytest.raises(AssertionError, match="'v': 'compiled'"):
        assert_same_grads(got, ref, rtol=1e-4, atol=1e-5)
    assert missing_grads({**got, "v": torch.zeros(3)}, {**ref, "v": None}) == ["v"]  # extra on the compiled side
    assert grad_error({**got, "v": ref["v"]}, ref) == 0.0


def test_bench_error_cell_names_lost_gradients():
    row = {"error": float("inf"), "missing_grads": ["a.weight", "a.bias"]}
    assert report._error_cell(row).startswith("FAIL: no gradient for 2 tensor(s) (a.weight, a.bias")
    assert report._error_cell({"error": 1.5e-3}) == "1.50e-03"
