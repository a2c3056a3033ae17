"""Inference graphs are lowered without Inductor's per-call input size/stride asserts (Dynamo's guards check
those before the call); training graphs keep them, and so does a caller who asks."""

import pytest
import torch
from torch import nn

from kp_compiler.lowering import inductor

PASSES = ["noop-elimination"]


def generated_code(tmp_path, grad: bool, **options) -> str:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"passes": PASSES, "dump_dir": str(tmp_path), **options})
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
    paths = (tmp_path / "graph-000" / "lowered-code.txt").read_text().split("\n")[1:]
    return "".join(open(p).read() for p in paths if p)


def test_an_inference_graph_has_no_input_asserts(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    code = generated_code(tmp_path, grad=False)
    assert "def call(" in code and "assert_size_stride(" not in code


def test_a_training_graph_keeps_them(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    assert "assert_size_stride(primals_" in generated_code(tmp_path, grad=True)


def test_the_caller_can_keep_them_for_inference(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    assert "assert_size_stride(" in generated_code(tmp_path, grad=False, inductor_config={"size_asserts": True})


@pytest.mark.parametrize("grad,requires_grad,off", [(False, True, True), (True, False, True), (True, True, False)])
def test_which_graphs_count_as_inference(grad, requires_grad, off, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_ALIGNMENT_ASSERTS", raising=False)
    import torch._inductor.config as config

    patches = {}
    with torch.set_grad_enabled(grad):
        inductor.inference_asserts_off(patches, [torch.randn(2, requires_grad=requires_grad), 3], config)
    assert (patches.get("size_asserts") is False) == off
    monkeypatch.setenv("TORCHINDUCTOR_SIZE_ASSERTS", "1")  # the environment decides where set
    patches = {}
    with torch.no_grad():
        inductor.inference_asserts_off(patches, [torch.randn(2)], config)
    assert "size_asserts" not in patches
