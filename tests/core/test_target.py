"""``Target.of``: what every pass reads about the graph it rewrites (here: the autocast state)."""

import torch

from kp_compiler.core.target import Target


def _captured(fn, *inputs):
    """The Dynamo graph and example inputs of ``fn``'s one graph, and the Target built from them there."""
    seen = {}

    def backend(gm, example_inputs):
        seen["target"] = Target.of(example_inputs, "inductor", gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*inputs)
    return seen["target"]


def test_autocast_entered_inside_the_graph():
    def inside(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x @ w
    assert _captured(inside, torch.randn(4, 4), torch.randn(4, 4)).autocast


def test_autocast_on_around_the_call_and_off():
    def plain(x, w):
        return x @ w
    assert not _captured(plain, torch.randn(4, 4), torch.randn(4, 4)).autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _captured(plain, torch.randn(4, 4), torch.randn(4, 4)).autocast
