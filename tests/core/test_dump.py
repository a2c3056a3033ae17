"""The dump format and folder layout, and report.json."""

import json
import os

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode

from kp_compiler.core.dump import format_graph, format_value
from kp_compiler.testing.models import MLP
from tests.utils import compile_and_collect, load_report


def test_format_value():
    assert format_value(torch.empty(2, 3)) == "f32[2, 3]"
    assert format_value(torch.empty(4, dtype=torch.bfloat16)) == "bf16[4]"
    assert format_value(torch.empty((), dtype=torch.bool)) == "b8[]"
    assert format_value((torch.empty(1), torch.empty(2, dtype=torch.int64))) == "(f32[1], i64[2])"
    assert format_value(None) == "none"


def test_one_node_per_line_with_op_inputs_shape_dtype():
    with FakeTensorMode() as mode:
        gm = make_fx(lambda x: torch.softmax(x.float() * 0.5, -1), pre_dispatch=True)(
            mode.from_tensor(torch.randn(2, 8, dtype=torch.float16)))
    lines = format_graph(gm.graph, "hdr").splitlines()
    assert lines[0] == "# kp_compiler hdr"
    assert lines[1].endswith("= input() : f16[2, 8]")
    assert any("= aten.mul.Tensor(%" in l and l.endswith(", 0.5) : f32[2, 8]") for l in lines)
    assert any("aten.softmax.int(%mul, -1) : f32[2, 8]" in l for l in lines)
    assert lines[-1] == "return (%softmax)"


def test_report_json_schema_and_numbering(tmp_path):
    model = MLP(d=8, hidden=16)
    x = torch.randn(2, 8)
    _, out1, _ = compile_and_collect(model, (x,), dump_dir=str(tmp_path), passes=["noop-elimination", "attention-to-sdpa"])
    torch._dynamo.reset()
    _, out2, _ = compile_and_collect(model, (x,), passes=["noop-elimination", "attention-to-sdpa"])
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # dumping never changes results
    torch._dynamo.reset()
    compile_and_collect(model, (torch.randn(3, 4, 8),), dump_dir=str(tmp_path), lowering="eager", passes=["noop-elimination", "attention-to-sdpa"])
    report = load_report(tmp_path)
    assert [g["lowering"] for g in report["graphs"]] == ["inductor", "eager"]
    first, second = report["graphs"]
    assert first["dump"].endswith("graph-000") and second["dump"].endswith("graph-001")
    assert set(first) >= {"id", "lowering", "passes", "fallbacks", "mode", "compile_ms"}
    p = first["passes"][0]
    assert p["name"] == "noop-elimination" and p["status"] == "ok"
    assert isinstance(p["matches"], int) and isinstance(p["ms"], float)
    passes = ["00-input.txt", "01-noop-elimination.txt", "02-attention-to-sdpa.txt", "dynamo.txt"]
    assert sorted(os.listdir(first["dump"])) == sorted(passes + ["lowered-code.txt", "lowered-forward.txt"])
    assert sorted(os.listdir(second["dump"])) == passes  # the eager lowering runs the graph as it is
    json.dumps(report)  # plain JSON all the way down


def test_dynamo_graph_dumped_in_torch_ir(tmp_path):
    model = MLP(d=8, hidden=16)
    compile_and_collect(model, (torch.randn(2, 8),), dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "dynamo.txt").read_text()
    assert "torch._C._nn.linear(" in text
    assert "gelu" in text


_WORKER = r"""
import sys, torch
torch.manual_seed(int(sys.argv[2]))
for i in range(4):
    torch._dynamo.reset()
    f = torch.compile(torch.nn.Linear(4 + i, 3), backend="kernelpytorch",
                      options={"dump_dir": sys.argv[1], "lowering": "eager"})
    f(torch.randn(2, 4 + i))
print("ok")
"""


def test_processes_dumping_into_one_folder_at_once(tmp_path):
    """Issue 14: a shared report.json.tmp and colliding graph numbers crashed 4 of 4 such runs."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    report = load_report(tmp_path)
    folders = [g["dump"] for g in report["graphs"]]
    assert len(folders) == 12 and len(set(folders)) == 12
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("graph-")) == [f"graph-{i:03d}" for i in range(12)]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_damaged_report_is_kept_aside_and_replaced(tmp_path):
    import pytest

    (tmp_path / "report.json").write_text('{"version": 1, "graphs": [}')
    model = MLP()
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        compile_and_collect(model, (torch.randn(3, 32),), dump_dir=str(tmp_path))
    assert len(load_report(tmp_path)["graphs"]) == 1
    (aside,) = [f for f in os.listdir(tmp_path) if f.startswith("report.json.damaged-")]
    assert (tmp_path / aside).read_text() == '{"version": 1, "graphs": [}'


def test_an_unusable_env_dump_dir_warns_and_compiles(tmp_path, monkeypatch):
    import pytest

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("KP_DUMP_DIR", str(blocker / "dumps"))  # under a file: cannot be created
    model = MLP()
    x = torch.randn(3, 32)
    with pytest.warns(RuntimeWarning, match="KP_DUMP_DIR"):
        _, out, records = compile_and_collect(model, (x,))
    torch.testing.assert_close(out, model(x))
    assert records and records[0].dump is None


def test_a_dump_folder_that_stops_being_writable_never_fails_the_compile(tmp_path, monkeypatch):
    import builtins

    import pytest

    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path)) and str(path).endswith(".txt"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    model = MLP()
    x = torch.randn(3, 32)
    with pytest.warns(RuntimeWarning, match="cannot write dumps"):
        _, out, _ = compile_and_collect(model, (x,), dump_dir=str(tmp_path))
    torch.testing.assert_close(out, model(x))


def test_the_lowered_forward_and_backward_and_the_generated_code_are_dumped(tmp_path):
    """Issue 14: the dumps held no backward graph and no pointer to what Inductor generated."""
    model = MLP()
    x = torch.randn(3, 32, requires_grad=True)
    compiled = torch.compile(model, backend="kernelpytorch", options={"dump_dir": str(tmp_path)})
    compiled(x).sum().backward()
    folder = tmp_path / "graph-000"
    forward = (folder / "lowered-forward.txt").read_text()
    backward = (folder / "lowered-backward.txt").read_text()
    assert forward.startswith("# kp_compiler graph 0 | forward graph as Inductor lowers it")
    assert "tangents" in backward and "aten.mm.default" in backward
    code = [l for l in (folder / "lowered-code.txt").read_text().splitlines() if not l.startswith("#")]
    assert code and all(os.path.isfile(p) and p.endswith(".py") for p in code)
    assert "def call(" in open(code[0]).read()
