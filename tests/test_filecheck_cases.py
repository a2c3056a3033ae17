"""Run every case in tests/filecheck/: compile its example, FileCheck its dumps.

A case file holds the model, the ``# RUN: <dump file> --check-prefix=P``
lines naming which dump each prefix checks, optional ``# OPTIONS: {...}``,
and the check lines themselves.
"""

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = sorted((Path(__file__).parent / "filecheck").glob("*.py"))


def directives(path: Path):
    runs, options = [], {}
    for line in path.read_text().splitlines():
        if line.startswith("# RUN:"):
            dump, prefix = line[len("# RUN:"):].split()
            runs.append((dump, prefix))
        elif line.startswith("# OPTIONS:"):
            options = ast.literal_eval(line[len("# OPTIONS:"):].strip())
    return runs, options


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case(case, tmp_path):
    runs, options = directives(case)
    assert runs, f"{case.name} has no '# RUN:' line"
    fn, inputs = runpy.run_path(str(case))["kp_example"]()
    compiled = torch.compile(fn, backend="kernelpytorch", options={**options, "dump_dir": str(tmp_path)})
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))
    folder = tmp_path / "graph-000"
    for dump, prefix in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "filecheck", str(case), prefix],
            stdin=open(folder / dump), capture_output=True, text=True,
        )
        assert proc.returncode == 0, f"{case.name} vs {dump}:\n{proc.stdout}{proc.stderr}\n{(folder / dump).read_text()}"


def test_a_broken_check_fails(tmp_path):
    """The runner is not vacuous: a wrong CHECK line makes filecheck fail."""
    check = tmp_path / "bad.check"
    check.write_text("# CHECK: aten.sigmoid.default\n")
    proc = subprocess.run([sys.executable, "-m", "filecheck", str(check)],
                          input="%relu = aten.relu.default(%x) : f32[4]\n", capture_output=True, text=True)
    assert proc.returncode != 0
