"""explain(): graphs, graph breaks with reasons, passes, lowering; and the CLI."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import kp_compiler


def breaks_once(x):
    y = (x * 1).relu()
    print("graph break here")
    return y.view(y.shape) + 1


def test_explain_reports_graphs_breaks_and_passes(capsys):
    x = torch.randn(4, 8)
    report = kp_compiler.explain(breaks_once, x, lowering="eager", passes=["noop-elimination"])
    torch.testing.assert_close(report.output, breaks_once(x))
    assert report.graph_count == 2
    assert report.graph_break_count == 1
    (reason,) = report.graph_breaks
    assert "print" in reason
    assert [g.lowering for g in report.graphs] == ["eager", "eager"]
    assert [g.passes[0].matches for g in report.graphs] == [1, 1]
    table = str(report)
    assert table.startswith("kernelpytorch explain: 2 graph(s), 1 graph break(s)")
    assert "graph break x1:" in table
    assert "noop-elimination" in table and "mul-by-one (noop.py:" in table
    assert "lowering=eager" in table


def test_explain_shows_rollbacks_and_fallbacks():
    kp_compiler.register_pass("always-fails", lambda gm: 1 / 0, replace=True)
    try:
        report = kp_compiler.explain(lambda x: x.sin(), torch.randn(3), passes=["always-fails"])
    finally:
        kp_compiler.unregister_pass("always-fails")
    table = str(report)
    assert "rolled_back" in table and "ZeroDivisionError" in table
    assert report.to_json()["graphs"][0]["passes"][0]["status"] == "rolled_back"


def test_cli_on_a_python_file(tmp_path):
    model_file = tmp_path / "model.py"
    model_file.write_text(textwrap.dedent("""
        import torch

        def kp_example():
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.0), torch.nn.ReLU())
            return model, (torch.randn(2, 8),)
    """))
    out_json = tmp_path / "r.json"
    script = str(Path(sys.executable).parent / "kp-explain")  # the console script beside this Python
    for cmd in ([script], [sys.executable, "-m", "kp_compiler", "explain"]):
        proc = subprocess.run(cmd + [str(model_file), "--option", "lowering=eager", "--option", "passes=['noop-elimination']",
                                     "--json", str(out_json)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "kernelpytorch explain: 1 graph(s), 0 graph break(s)" in proc.stdout
        assert "inactive-dropout" in proc.stdout
        assert json.loads(out_json.read_text())["graphs"][0]["lowering"] == "eager"


def test_cli_names_a_missing_entry(tmp_path):
    model_file = tmp_path / "empty.py"
    model_file.write_text("x = 1\n")
    proc = subprocess.run([sys.executable, "-m", "kp_compiler", "explain", str(model_file)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "defines no function 'kp_example'" in proc.stderr


def test_a_split_expert_loop_names_the_setting_that_captures_it():
    from kp_compiler.testing.models import LoopMoE

    report = kp_compiler.explain(LoopMoE(16, 32, 4, 2), torch.randn(2, 5, 16))
    text = str(report)
    assert report.graph_break_count >= 1 and "nonzero" in text
    assert "hint: " in text and "capture_dynamic_output_shape_ops = True" in text
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        whole = kp_compiler.explain(LoopMoE(16, 32, 4, 2), torch.randn(2, 5, 16))
    assert whole.graph_count == 1 and whole.graph_break_count == 0 and "hint" not in str(whole)


def test_graphs_are_numbered_per_report():
    """Issue 14: a second explain in one process labelled its only graph "graph 1"."""
    kp_compiler.explain(lambda x: x.sin(), torch.randn(3))
    report = str(kp_compiler.explain(lambda x: x.cos(), torch.randn(3)))
    assert "1 graph(s)" in report
    assert "\ngraph 0 (record " in report and "\ngraph 1" not in report


def test_cli_imports_the_files_sibling_modules_and_names_a_missing_file(tmp_path):
    (tmp_path / "helper.py").write_text("import torch\nLAYER = torch.nn.Linear(4, 4)\n")
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import torch
        from helper import LAYER

        def kp_example():
            return LAYER, (torch.randn(2, 4),)
    """))
    cmd = [sys.executable, "-m", "kp_compiler", "explain"]
    proc = subprocess.run(cmd + [str(tmp_path / "model.py"), "--option", "lowering=eager"], capture_output=True,
                          text=True, cwd=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr
    assert "1 graph(s)" in proc.stdout
    proc = subprocess.run(cmd + [str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"kp-explain: {tmp_path / 'nope.py'}: no such file"
