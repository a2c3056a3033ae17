"""User passes, rollback, strict, verify, fallbacks and logging."""

import logging
import os

import pytest
import torch

import kp_compiler
from kp_compiler.testing.models import MLP
from tests.utils import compile_and_collect, filecheck, load_report

aten = torch.ops.aten


@pytest.fixture
def register():
    names = []

    def _register(name, fn):
        kp_compiler.register_pass(name, fn)
        names.append(name)
        return name

    yield _register
    for name in names:
        kp_compiler.unregister_pass(name)


def relu_to_sigmoid(gm):
    """A deliberately wrong pass: it changes what the graph computes."""
    n = 0
    for node in gm.graph.nodes:
        if node.target is aten.relu.default:
            node.target = aten.sigmoid.default
            n += 1
    gm.recompile()
    return n


def relu_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_user_pass_selected_counted_and_dumped(register, tmp_path):
    seen = []

    def count_linears(gm):
        seen.append(gm)
        return sum(n.target is aten.linear.default for n in gm.graph.nodes)

    register("count-linears", count_linears)
    passes = ["noop-elimination", "attention-to-sdpa", "count-linears"]
    model = relu_model()
    x = torch.randn(3, 8)
    _, out, records = compile_and_collect(model, (x,), passes=passes, dump_dir=str(tmp_path))
    torch.testing.assert_close(out, model(x))
    assert len(seen) == 1 and isinstance(seen[0], torch.fx.GraphModule)
    report = load_report(tmp_path)
    (graph,) = report["graphs"]
    assert [p["name"] for p in graph["passes"]] == ["noop-elimination", "attention-to-sdpa", "count-linears"]
    assert graph["passes"][2] | {"ms": 0} == {
        "name": "count-linears", "matches": 2, "ms": 0, "status": "ok", "reason": "", "by_rule": {}, "notes": [],
        "guards_added": []}
    assert sorted(os.listdir(graph["dump"])) == [
        "00-input.txt", "01-noop-elimination.txt", "02-attention-to-sdpa.txt", "03-count-linears.txt", "dynamo.txt",
        "lowered-code.txt", "lowered-forward.txt"]
    filecheck(
        "CHECK: after count-linears | status ok | matches 2\n"
        "CHECK: aten.linear.default\nCHECK: aten.relu.default\nCHECK: aten.linear.default\nCHECK: return\n",
        open(os.path.join(graph["dump"], "03-count-linears.txt")).read(),
    )


def test_raising_pass_is_rolled_back(register, tmp_path):
    def half_done_then_raise(gm):
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                node.target = aten.sigmoid.default  # damage first, then fail
        raise RuntimeError("boom")

    register("explodes", half_done_then_raise)
    model = relu_model()
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="pass 'explodes' was rolled back: RuntimeError: boom"):
        _, out, records = compile_and_collect(model, (x,), passes=["explodes"], dump_dir=str(tmp_path))
    torch.testing.assert_close(out, model(x))
    assert records[0].fallbacks == [], "the restored graph must still lower (Dynamo metadata kept)"
    (rec,) = load_report(tmp_path)["graphs"][0]["passes"]
    assert (rec["status"], rec["matches"], rec["reason"]) == ("rolled_back", 0, "RuntimeError: boom")
    dumped = open(os.path.join(tmp_path, "graph-000", "01-explodes.txt")).read()
    filecheck("CHECK: status rolled_back\nCHECK: aten.relu.default\nCHECK-NOT: sigmoid\n", dumped)


def test_raising_pass_under_strict_raises(register):
    register("explodes", lambda gm: 1 / 0)
    f = torch.compile(relu_model(), backend="kernelpytorch", options={"passes": ["explodes"], "strict": True})
    with pytest.raises(Exception, match="pass 'explodes' failed") as err:
        f(torch.randn(3, 8))
    assert isinstance(getattr(err.value, "inner_exception", err.value), kp_compiler.PassError)


def test_ill_typed_graph_is_rolled_back(register):
    def bad_shapes(gm):
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                with gm.graph.inserting_after(node):
                    bad = gm.graph.call_function(aten.mm.default, (node, node))  # [3,8] @ [3,8]
                node.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        gm.recompile()
        return 1

    register("bad-shapes", bad_shapes)
    model = relu_model()
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="bad-shapes"):
        _, out, records = compile_and_collect(model, (x,), passes=["bad-shapes"])
    torch.testing.assert_close(out, model(x))
    assert records[0].passes[0].status == "rolled_back"


def test_pass_must_return_a_count(register):
    register("returns-none", lambda gm: None)
    with pytest.warns(RuntimeWarning, match="must return the number of rewrites"):
        _, _, records = compile_and_collect(relu_model(), (torch.randn(3, 8),), passes=["returns-none"])
    assert records[0].passes[0].status == "rolled_back"


def test_verify_catches_a_wrong_pass(register):
    register("relu-to-sigmoid", relu_to_sigmoid)
    model = relu_model()
    x = torch.randn(3, 8)
    # Without verify the wrong rewrite stands (the test would be vacuous otherwise) ...
    _, out, records = compile_and_collect(model, (x,), passes=["relu-to-sigmoid"])
    assert records[0].passes[0].status == "ok"
    assert not torch.allclose(out, model(x))
    # ... with verify it is caught and rolled back.
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="verify: output 0"):
        _, out, records = compile_and_collect(model, (x,), passes=["relu-to-sigmoid"], verify=True)
    assert records[0].passes[0].status == "rolled_back"
    assert records[0].passes[0].reason.startswith("verify:")
    assert records[0].fallbacks == []
    torch.testing.assert_close(out, model(x))


def test_verify_accepts_a_correct_pass():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.0), torch.nn.GELU())
    x = torch.randn(3, 8)
    _, out, records = compile_and_collect(model, (x,), verify=True, passes=kp_compiler.default_passes())
    assert records[0].passes[0].status == "ok"
    assert records[0].passes[0].matches >= 1
    torch.testing.assert_close(out, model(x))


def test_canonicalization_failure_falls_back_to_inductor(monkeypatch):
    import kp_compiler.backend as backend

    def broken(gm, inputs):
        raise NotImplementedError("cannot trace this")

    monkeypatch.setattr(backend, "canonicalize", broken)
    model = MLP(d=8, hidden=16)
    x = torch.randn(2, 8)
    with pytest.warns(RuntimeWarning, match="canonicalization failed"):
        _, out, records = compile_and_collect(model, (x,), passes=kp_compiler.default_passes())
    torch.testing.assert_close(out, model(x))
    assert records[0].lowering == "inductor"
    assert "NotImplementedError: cannot trace this" in records[0].fallbacks[0]


def test_lowering_failure_falls_back_to_the_dynamo_graph(monkeypatch):
    from kp_compiler.lowering import registry as sel

    real = sel.LOWERINGS["inductor"]
    calls = []

    def flaky(gm, *args):
        calls.append(gm.meta.get("kp_source"))
        if gm.meta.get("kp_source") == "canonical":
            raise RuntimeError("inductor choked")
        return real(gm, *args)

    monkeypatch.setitem(sel.LOWERINGS, "inductor", flaky)
    model = MLP(d=8, hidden=16)
    x = torch.randn(2, 8)
    with pytest.warns(RuntimeWarning, match="lowering the rewritten graph failed"):
        _, out, records = compile_and_collect(model, (x,), passes=kp_compiler.default_passes())
    assert calls == ["canonical", None]
    torch.testing.assert_close(out, model(x))


def test_logging_reports_each_pass(caplog):
    with caplog.at_level(logging.DEBUG, logger="kp_compiler"):
        compile_and_collect(relu_model(), (torch.randn(3, 8),), passes=kp_compiler.default_passes())
    text = caplog.text
    assert "pass noop-elimination: ok" in text
    assert "lowering=inductor" in text


def _edit_mul_literal(gm):
    for node in gm.graph.nodes:
        if node.target is aten.mul.Tensor and node.args[1] == 2.0:
            node.args = (node.args[0], 2.002)
            return 1
    return 0


def _edit_gelu_kwarg(gm):
    for node in gm.graph.nodes:
        if node.target is aten.gelu.default:
            node.kwargs = {"approximate": "none"}
            return 1
    return 0


@pytest.mark.parametrize("edit", [_edit_mul_literal, _edit_gelu_kwarg], ids=["arg", "kwarg"])
def test_verify_sees_a_literal_edited_in_place(register, edit):
    """Issue 14: the graph fingerprint ignored literal args and kwargs, so verify never ran for these."""
    name = register(f"edit-{edit.__name__}", edit)
    x = torch.randn(4, 8)
    fn = lambda x: torch.nn.functional.gelu(x * 2.0, approximate="tanh")  # noqa: E731
    with pytest.warns(RuntimeWarning, match="rolled back"):
        _, out, records = compile_and_collect(fn, (x,), passes=[name], verify=True)
    torch.testing.assert_close(out, fn(x))
    (p,) = records[0].passes
    assert p.status == "rolled_back" and "verify" in p.reason


def test_a_pass_that_changes_an_output_shape_is_rolled_back_without_verify(register):
    def narrow_output(gm):
        (out,) = [n for n in gm.graph.nodes if n.op == "output"]
        with gm.graph.inserting_before(out):
            sliced = gm.graph.call_function(aten.slice.Tensor, (out.args[0][0], 1, 0, 2))
        out.args = ((sliced,),)
        return 1

    name = register("narrow-output", narrow_output)
    model = relu_model()
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        _, out, records = compile_and_collect(model, (x,), passes=[name])
    assert out.shape == (3, 4)
    (p,) = records[0].passes
    assert p.status == "rolled_back" and "[3, 4]" in p.reason and "[3, 2]" in p.reason


def test_a_replaced_pass_takes_effect_without_a_dynamo_reset():
    """Issue 14: Dynamo reused the old compile because the options compared equal."""
    def keep(gm):
        return 0

    x = torch.randn(3, 8)
    fn = lambda x: torch.relu(x) + 1  # noqa: E731
    kp_compiler.register_pass("swappable", keep)
    try:
        first = torch.compile(fn, backend="kernelpytorch", options={"passes": ["swappable"]})
        torch.testing.assert_close(first(x), fn(x))
        kp_compiler.register_pass("swappable", relu_to_sigmoid, replace=True)
        second = torch.compile(fn, backend="kernelpytorch", options={"passes": ["swappable"]})
        torch.testing.assert_close(second(x), torch.sigmoid(x) + 1)  # the new pass ran
        torch.testing.assert_close(first(x), fn(x))  # what was compiled before keeps its graph
    finally:
        kp_compiler.unregister_pass("swappable")


def test_a_pass_that_never_returns_is_interrupted_and_rolled_back(register):
    """Issue 14: a pass that never returned hung the compile."""
    def spin(gm):
        while True:
            pass

    name = register("spin", spin)
    model = relu_model()
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        _, out, records = compile_and_collect(model, (x,), passes=[name, "noop-elimination"], pass_timeout_s=0.5)
    torch.testing.assert_close(out, model(x))
    spun, noop = records[0].passes
    assert spun.status == "rolled_back" and "pass_timeout_s" in spun.reason and spun.ms >= 500
    assert noop.status == "ok"  # the next pass ran on the restored graph


def test_a_slow_pass_is_named_in_a_warning(register, monkeypatch):
    import time

    from kp_compiler.core import pass_manager

    monkeypatch.setattr(pass_manager, "WARN_AFTER_S", 0.2)
    name = register("slow", lambda gm: time.sleep(0.6) or 0)
    with pytest.warns(RuntimeWarning, match="pass .slow. has been running for 0.2 s; bound it with"):
        compile_and_collect(relu_model(), (torch.randn(3, 8),), passes=[name])


def test_pass_timeout_option_is_checked():
    from kp_compiler.options import parse_options

    assert parse_options(options={"pass_timeout_s": 2}).pass_timeout_s == 2
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="pass_timeout_s"):
            parse_options(options={"pass_timeout_s": bad})
