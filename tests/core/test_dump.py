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
    _, out1, _ = compile_and_collect(model, (x,), dump_dir=str(tmp_path))
    torch._dynamo.reset()
    _, out2, _ = compile_and_collect(model, (x,))
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # dumping never changes results
    torch._dynamo.reset()
    compile_and_collect(model, (torch.randn(3, 4, 8),), dump_dir=str(tmp_path), lowering="eager")
    report = load_report(tmp_path)
    assert [g["lowering"] for g in report["graphs"]] == ["inductor", "eager"]
    first, second = report["graphs"]
    assert first["dump"].endswith("graph-000") and second["dump"].endswith("graph-001")
    assert set(first) >= {"id", "lowering", "passes", "fallbacks", "mode", "compile_ms"}
    p = first["passes"][0]
    assert p["name"] == "noop-elimination" and p["status"] == "ok"
    assert isinstance(p["matches"], int) and isinstance(p["ms"], float)
    for g in report["graphs"]:
        assert sorted(os.listdir(g["dump"])) == ["00-input.txt", "01-noop-elimination.txt",
                                                 "02-attention-to-sdpa.txt", "dynamo.txt"]
    json.dumps(report)  # plain JSON all the way down


def test_dynamo_graph_dumped_in_torch_ir(tmp_path):
    model = MLP(d=8, hidden=16)
    compile_and_collect(model, (torch.randn(2, 8),), dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "dynamo.txt").read_text()
    assert "torch._C._nn.linear(" in text
    assert "gelu" in text
