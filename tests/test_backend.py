"""The backend end to end: entry point, forward, backward, dynamic shapes, lowerings."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kp_compiler.testing.models import MLP, Block
from tests.utils import check_forward_backward, compile_and_collect, load_report

MODELS = {
    "block": (lambda: Block(d=32, heads=4, max_len=16), lambda b, t: (torch.randn(b, t, 32),)),
    "mlp": (lambda: MLP(d=16, hidden=32), lambda b, t: (torch.randn(b, t, 16),)),
}


def test_entry_point_without_import(tmp_path):
    """A process that never imports kp_compiler can still use backend="kernelpytorch"."""
    script = textwrap.dedent(f"""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        assert "kp_compiler" not in sys.modules
        f = torch.compile(m, backend="kernelpytorch", options={{"dump_dir": {str(tmp_path)!r}}})
        x = torch.randn(4, 8)
        torch.testing.assert_close(f(x), m(x))
        print("OK", "kp_compiler" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OK", "True"]
    report = load_report(tmp_path)
    assert len(report["graphs"]) == 1
    assert report["graphs"][0]["lowering"] == "inductor"


@pytest.mark.parametrize("lowering", ["inductor", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_backward_matches_eager(name, lowering, dynamic):
    make_model, make_input = MODELS[name]
    model = make_model()
    compiled = torch.compile(model, backend="kernelpytorch", dynamic=dynamic, options={"lowering": lowering})
    shapes = [(2, 8), (3, 5), (4, 12)] if dynamic else [(2, 8), (2, 8)]
    from kp_compiler.core.report import collect

    with collect() as records:
        check_forward_backward(model, compiled, lambda: (make_input(b, t) for b, t in shapes))
    assert records, "the backend never ran"
    assert {r.lowering for r in records} == {lowering}
    assert all(not r.fallbacks for r in records), [r.fallbacks for r in records]
    if dynamic:
        assert len(records) == 1, "dynamic=True should compile one graph for all shapes"


def test_mark_dynamic_and_recompile():
    model = MLP(d=16, hidden=32)
    compiled = torch.compile(model, backend="kernelpytorch")
    x = torch.randn(4, 16)
    torch._dynamo.mark_dynamic(x, 0)
    from kp_compiler.core.report import collect

    with collect() as records:
        torch.testing.assert_close(compiled(x), model(x))
        for rows in (7, 2, 9):
            y = torch.randn(rows, 16)
            torch.testing.assert_close(compiled(y), model(y))
        z = torch.randn(3, 5, 16)  # a new rank: Dynamo must recompile
        torch.testing.assert_close(compiled(z), model(z))
    assert len(records) == 2, "one graph for the dynamic 2-D shapes, one for the 3-D input"


def test_dynamic_shapes_are_symbolic_in_canonical_graph(tmp_path):
    model = MLP(d=16, hidden=32)
    compiled, out, records = compile_and_collect(model, (torch.randn(5, 16),), dump_dir=str(tmp_path),
                                                 passes=["noop-elimination"])
    x = torch.randn(6, 16)
    torch._dynamo.mark_dynamic(x, 0)
    torch.testing.assert_close(compiled(x), model(x))
    report = load_report(tmp_path)
    assert len(report["graphs"]) == 2
    text = open(os.path.join(report["graphs"][1]["dump"], "00-input.txt")).read()
    assert "f32[s" in text, text


def test_modes_compile_and_match():
    model = MLP(d=16, hidden=32)
    x = torch.randn(4, 16)
    for mode in ("reduce-overhead", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kernelpytorch", mode=mode)
        from kp_compiler.core.report import collect

        with collect() as records:
            torch.testing.assert_close(compiled(x), model(x))
        assert records[0].mode == mode


def test_parameters_stay_static_inputs_for_inductor():
    """Dynamo's input metadata reaches AOTAutograd: parameters are static inputs.

    Without it CUDA graphs would copy every parameter on every replay.
    """
    import logging

    logger = logging.getLogger("torch._inductor.compile_fx.__cudagraph_static_inputs")
    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Grab(level=logging.DEBUG)
    torch._logging.set_logs(cudagraph_static_inputs=True)
    logger.addHandler(handler)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        for backend in ("inductor", "kernelpytorch"):
            torch._dynamo.reset()
            torch.compile(model, backend=backend)(torch.randn(2, 16))
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
    idxs = [m for m in seen if m.startswith("static input idxs compile_fx_inner")]
    assert idxs == ["static input idxs compile_fx_inner: [0, 1, 3, 4]"] * 2, seen


def test_tensor_constants_do_not_force_a_fallback():
    """make_fx lifts torch.tensor(...) constants; AOTAutograd must still accept the graph."""
    lin = torch.nn.Linear(2, 2)

    def f(x):
        return lin(x) * torch.tensor([1.0, 2.0]) + torch.tensor([]).numel()

    x = torch.randn(3, 2)
    _, out, records = compile_and_collect(f, (x,))
    torch.testing.assert_close(out, f(x))
    assert records[0].fallbacks == []


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu_(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("lowering", ["inductor", "eager"])
def test_mutations_match_eager(lowering):
    """Buffer updates (BatchNorm running stats) and in-place ops on inputs behave as in eager."""
    import copy

    model = _ConvBN()
    ref_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend="kernelpytorch", options={"lowering": lowering})
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref_model(x))
    torch.testing.assert_close(model.bn.running_mean, ref_model.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, ref_model.bn.running_var)
    assert int(model.bn.num_batches_tracked) == int(ref_model.bn.num_batches_tracked) == 2

    def bump(t):
        t.add_(1)
        return t * 2

    a = torch.randn(5)
    b = a.clone()
    out = torch.compile(bump, backend="kernelpytorch", options={"lowering": lowering})(a)
    torch.testing.assert_close(out, bump(b))
    torch.testing.assert_close(a, b)  # the input was mutated in place, as in eager
