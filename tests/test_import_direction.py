"""The package's imports go one way (issue 15): core <- ops <- passes, core <- ops <- lowering, all <- backend.

Read from the source (``kp_compiler/testing/imports.py``), function-level and type-only imports included.
"""

from kp_compiler.testing import imports

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "ops": {"core"},
    "passes": {"core", "ops"},
    "lowering": {"core", "ops"},
    "runtime": {"core"},
}


def test_layers_import_only_downwards():
    bad = {(a, b): n for (a, b), n in imports.layer_edges().items() if a in ALLOWED and b not in ALLOWED[a]}
    assert not bad, f"imports against the direction (importer -> imported: count): {bad}"


def test_no_module_cycle():
    assert imports.cycles() == []


def test_the_checker_sees_a_wrong_edge_and_a_cycle():
    """Not vacuous: a lowering -> passes edge and a two-module cycle are found."""
    edges = {("kp_compiler.lowering.x", "kp_compiler.passes.y"), ("kp_compiler.passes.a", "kp_compiler.passes.b"),
             ("kp_compiler.passes.b", "kp_compiler.passes.a")}
    assert imports.layer_edges(edges)[("lowering", "passes")] == 1
    assert imports.cycles(edges) == [["kp_compiler.passes.a", "kp_compiler.passes.b"]]


def test_no_module_reads_fx_private_erased_flag():
    for name, path in imports.modules().items():
        text = path.read_text()
        assert '"_erased"' not in text and "._erased" not in text, name
