"""The Inductor lowering tags its cache keys with the kp:: op sources."""

import hashlib
from pathlib import Path

import torch

import kp_compiler
from kp_compiler.lowering import inductor


def test_ops_version_hashes_every_module_an_op_or_pass_runs():
    """core, ops, passes and lowering (issue 15: ops/fp8_weights.py, which an op calls, was left out)."""
    root = Path(kp_compiler.__file__).parent
    digest = hashlib.sha256()
    paths = sorted(p for part in ("core", "ops", "passes", "lowering") for p in (root / part).rglob("*.py"))
    assert root / "ops" / "fp8_weights.py" in paths and root / "passes" / "fp8" / "linear.py" in paths
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    assert inductor.ops_version() == digest.hexdigest()[:16]


def test_lowering_puts_the_tag_in_the_config_inductor_caches_key_on(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    inductor.lower(gm, [torch.randn(2)], "default", {})
    tag = seen["post_grad_custom_post_pass"]
    assert tag.uuid() == f"kernelpytorch-ops-{inductor.ops_version()}"
    graph = torch.fx.symbolic_trace(lambda x: x * 2).graph
    before = str(graph)
    tag(graph)
    assert str(graph) == before  # the tag changes nothing
    seen.clear()
    inductor.lower(gm, [torch.randn(2)], "default", {"post_grad_custom_post_pass": None})
    assert seen["post_grad_custom_post_pass"] is None  # a user's own setting wins
