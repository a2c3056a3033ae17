"""The ``xla`` lowering on XLA:CPU (``PJRT_DEVICE=CPU``): the torch 2.9 + torch_xla 2.9 lane.

Run by ``scripts/test.sh`` in the second lane's virtual environment; the first
lane (no torch_xla) leaves this folder out.
"""

import copy
import os

import pytest
import torch

os.environ.setdefault("PJRT_DEVICE", "CPU")
torch_xla = pytest.importorskip("torch_xla")
import torch_xla.core.xla_model as xm  # noqa: E402

from kp_compiler.core.report import collect  # noqa: E402
from kp_compiler.lowering.xla import XlaDeviceMismatch  # noqa: E402
from kp_compiler.testing.models import TinyGPT  # noqa: E402


def xla_device():
    return torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()


def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT(vocab=64, d=32, heads=4, layers=2, max_len=16)


def test_forward_matches_eager_and_reports_xla():
    dev = xla_device()
    torch._dynamo.reset()
    cpu_model = tiny_gpt().eval()
    compiled = torch.compile(copy.deepcopy(cpu_model).to(dev), backend="kernelpytorch")
    with torch.no_grad(), collect() as records:
        for _ in range(2):  # fresh random inputs each time, one compile
            idx = torch.randint(0, 64, (2, 16))
            torch.testing.assert_close(compiled(idx.to(dev)).cpu(), cpu_model(idx), rtol=1e-5, atol=1e-5)
    (rec,) = records
    assert rec.lowering == "xla" and not rec.fallbacks
    passes = {p.name: (p.matches, p.status) for p in rec.passes}
    assert passes["attention-to-sdpa"] == (2, "ok")  # both layers' attention became SDPA
    assert passes["attention-kernels"] == (0, "ok")  # causal: nothing for the kernel table to pick


def test_training_steps_match_eager():
    """Forward, backward and an SGD step, twice: losses and parameters equal the CPU run."""
    dev = xla_device()
    torch._dynamo.reset()
    cpu_model = tiny_gpt()
    xla_model = copy.deepcopy(cpu_model).to(dev)
    opt_cpu = torch.optim.SGD(cpu_model.parameters(), lr=0.1)
    opt_xla = torch.optim.SGD(xla_model.parameters(), lr=0.1)
    compiled = torch.compile(xla_model, backend="kernelpytorch")
    for _ in range(2):
        idx = torch.randint(0, 64, (2, 16))
        loss_cpu = torch.nn.functional.cross_entropy(cpu_model(idx).flatten(0, 1), idx.flatten())
        loss_cpu.backward()
        opt_cpu.step()
        opt_cpu.zero_grad()
        idx_x = idx.to(dev)
        loss_xla = torch.nn.functional.cross_entropy(compiled(idx_x).flatten(0, 1), idx_x.flatten())
        loss_xla.backward()
        opt_xla.step()
        opt_xla.zero_grad()
        (getattr(torch_xla, "sync", None) or xm.mark_step)()
        torch.testing.assert_close(loss_xla.cpu(), loss_cpu.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(cpu_model.parameters(), xla_model.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-5)


def test_structured_masks_stay_on_sdpa_for_xla(tmp_path):
    """A sliding window is lifted, but the kernel table gives XLA SDPA (no FlexAttention there)."""
    from bench.cases import attention as cases

    dev = xla_device()
    torch._dynamo.reset()
    fn = cases.make_sliding_window(8)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    compiled = torch.compile(fn, backend="kernelpytorch", options={"dump_dir": str(tmp_path)})
    with torch.no_grad(), collect() as records:
        out = compiled(q.to(dev), k.to(dev), v.to(dev))
    torch.testing.assert_close(out.cpu(), fn(q, k, v), rtol=1e-5, atol=1e-5)
    (rec,) = records
    kernels = [p for p in rec.passes if p.name == "attention-kernels"]
    assert rec.lowering == "xla" and kernels and kernels[0].matches == 0
    text = (tmp_path / "graph-000" / "03-attention-kernels.txt").read_text()
    assert "flex_attention needs the Inductor lowering, not 'xla'" in text


def test_xla_lowering_with_cpu_tensors_is_a_clear_error():
    torch._dynamo.reset()
    f = torch.compile(torch.nn.Linear(4, 4), backend="kernelpytorch", options={"lowering": "xla"})
    with pytest.raises(Exception, match="needs every input on an XLA device") as info:
        f(torch.randn(2, 4))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, XlaDeviceMismatch)


@pytest.mark.parametrize("form", ["saved-tensors", "non-differentiable-output", "checkpoint"])
def test_custom_autograd_gradients_match_eager(form):
    """The ``xla`` lowering also keeps a custom autograd.Function's (and a checkpoint's) backward."""
    from kp_compiler.testing.compare import assert_same_grads, grads_of
    from tests.core.test_regions import PIPELINE, Model

    dev = xla_device()
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = Model(form)
    model = copy.deepcopy(ref).to(dev)
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PIPELINE})  # canonicalized
    x = torch.randn(4, 8)
    with collect() as records:
        compiled(x.to(dev)).square().mean().backward()
    ref(x).square().mean().backward()
    got = {n: None if g is None else g.cpu() for n, g in grads_of(model.named_parameters()).items()}
    assert_same_grads(got, grads_of(ref.named_parameters()), rtol=1e-4, atol=1e-5)
    assert [r.lowering for r in records] == ["xla"] and records[0].autograd_regions == 1
