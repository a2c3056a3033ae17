"""The docs' examples run as written."""

import re
from pathlib import Path

import kp_compiler

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_writing_passes_example_runs(capsys):
    example = python_blocks(DOCS / "writing-passes.md")[0]
    try:
        exec(compile(example, "writing-passes.md", "exec"), {})
    finally:
        for name in ("my-cleanup", "count-matmuls"):
            kp_compiler.unregister_pass(name)
    printed = capsys.readouterr().out
    assert "my-cleanup         ok                 2" in printed
    assert "double-neg (writing-passes.md:" in printed and "square (writing-passes.md:" in printed
    assert "count-matmuls      ok                 1" in printed


def test_writing_passes_region_example_runs(capsys):
    blocks = python_blocks(DOCS / "writing-passes.md")
    assert len(blocks) == 2
    try:
        exec(compile(blocks[1], "writing-passes.md", "exec"), {})
    finally:
        kp_compiler.unregister_pass("swish-to-silu")
    assert capsys.readouterr().out.strip().splitlines()[-1] == "[2, 8]"


def test_architecture_file_table_is_generated_from_the_source():
    from kp_compiler.testing import layout

    text = (DOCS / "architecture.md").read_text()
    assert layout.BEGIN in text and layout.END in text
    assert text == layout.render(text), "docs/architecture.md is stale: run python -m kp_compiler.testing.layout"
    for path in layout.modules().values():
        assert f"`{path.relative_to(layout.PACKAGE).as_posix()}`" in text
