"""Helpers shared by the tests: compile, compare with eager, read dumps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from kp_compiler.core.report import collect
from kp_compiler.testing.compare import assert_same_grads, grads_of


def compile_and_collect(model, inputs, **options):
    """Compile with the backend, run once; return (output, [GraphRecord])."""
    compiled = torch.compile(model, backend="kernelpytorch", options=options or None)
    with collect() as records:
        out = compiled(*inputs)
    return compiled, out, records


def check_forward_backward(model, compiled, make_inputs, rtol=1e-4, atol=1e-5):
    """Forward outputs and parameter/input gradients equal eager on fresh random inputs.

    A gradient that is ``None`` on one side only fails (``assert_same_grads``).
    """
    for inputs in make_inputs():
        ref_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        got_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        model.zero_grad(set_to_none=True)
        ref = model(*ref_in)
        ref.square().mean().backward()
        ref_grads = {**grads_of(model.named_parameters()), **grads_of(enumerate(ref_in))}
        model.zero_grad(set_to_none=True)
        got = compiled(*got_in)
        got.square().mean().backward()
        got_grads = {**grads_of(model.named_parameters()), **grads_of(enumerate(got_in))}
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
        assert_same_grads(got_grads, ref_grads, rtol=rtol, atol=atol)


def input_grads(fn, inputs):
    """``fn``'s output on fresh leaf copies of ``inputs``, and their gradients of ``out.square().sum()`` by position."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.square().sum().backward()
    return out, grads_of(enumerate(leaves))


def loss_and_grads(model, step, *args):
    """``step(*args)``'s loss and ``model``'s parameter gradients from its backward (cleared before and after)."""
    model.zero_grad(set_to_none=True)
    loss = step(*args)
    loss.backward()
    grads = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def load_report(dump_dir) -> dict:
    with open(os.path.join(dump_dir, "report.json")) as f:
        return json.load(f)


def filecheck(check_text: str, input_text: str) -> None:
    """Run the ``filecheck`` tool; fail the test with its message on mismatch."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".check", delete=False) as f:
        f.write(check_text)
        path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "filecheck", path],
            input=input_text, capture_output=True, text=True,
        )
    finally:
        os.unlink(path)
    assert proc.returncode == 0, f"FileCheck failed:\n{proc.stdout}\n{proc.stderr}\n--- input ---\n{input_text}"
