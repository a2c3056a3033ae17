"""Model-zoo conformance on the CPU: outputs and gradients equal eager (fp32)."""

import importlib.util

import pytest
import torch

from .check import TOLERANCE, check
from .entries import ENTRIES

FAST = [e for e in ENTRIES if e.fast]


@pytest.mark.parametrize("entry", FAST, ids=[e.name for e in FAST])
def test_matches_eager(entry):
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    assert not missing, f"{entry.name} needs {missing}: install the project's test extras"
    result = check(entry)
    assert not result.failed, result.failed
    assert result.graphs >= 1, "the backend never ran"
    assert not result.fallbacks, result.fallbacks
    assert not result.rolled_back, result.rolled_back
    # every graph either went through the passes or had nothing any of them could rewrite
    assert "noop-elimination" in result.passes or result.idle_graphs == result.graphs, result
    tol = TOLERANCE[torch.float32]
    assert result.forward_error < tol, result
    assert not result.missing_grads, f"gradients lost: {result.missing_grads}"
    assert result.grad_error < tol, result


def test_loop_moe_captures_in_one_graph():
    """The handwritten range(E) loop is one graph with capture_dynamic_output_shape_ops."""
    from .entries import BY_NAME

    result = check(BY_NAME["moe-loop-handwritten"])
    assert (result.graphs, result.graph_breaks) == (1, 0), result
