"""Every rewrite is a registered pass (issue 15): the FP8 and attention-kernel steps included.

``default_passes()`` lists them in order, ``options["passes"]`` can name each, and the report lists a
pass that does not apply to the target with the reason.
"""

import torch

import kp_compiler
from kp_compiler.core.devices import DeviceInfo
from kp_compiler.core.target import Target
from kp_compiler.testing.models import MLP
from tests.utils import compile_and_collect


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


def test_default_passes_name_every_rewrite_in_order():
    assert kp_compiler.default_passes() == [
        "noop-elimination", "attention-to-sdpa", "attention-kernels", "moe-dispatch", "linear-group",
        "linear-cross-entropy", "fp8-linear"]


class AttentionProj(Attention):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, q, k, v):
        return self.proj(super().forward(q, k, v))


def test_fp8_linear_is_listed_as_not_applicable_without_fp8():
    """Listed with the reason where the graph has a linear for it; unmentioned where it has nothing to look at."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    _, _, records = compile_and_collect(AttentionProj(), (q, k, v))
    (rec,) = records
    assert "fp8-linear" not in [p.name for p in rec.passes]
    (fp8,) = [s for s in rec.skipped if s["pass"] == "fp8-linear"]
    assert fp8["reason"] == "not applicable on this target: FP8 is off (options['fp8'])"
    assert "left out fp8-linear: not applicable on this target" in str(kp_compiler.explain(AttentionProj(), q, k, v))
    torch._dynamo.reset()
    _, _, records = compile_and_collect(Attention(), (q, k, v))
    assert not [s for r in records for s in r.skipped if s["pass"] == "fp8-linear"]
    assert "fp8-linear" not in [p.name for r in records for p in r.passes]


def test_fp8_linear_can_be_named_and_runs_with_its_options():
    torch._dynamo.reset()
    x = torch.randn(80, 32)
    model = MLP(d=32, hidden=64)
    _, out, records = compile_and_collect(model, (x,), passes=["fp8-linear"],
                                          fp8={"emulate": True, "min_dims": [64, 64, 32]})
    assert [(p.name, p.matches) for p in records[0].passes] == [("fp8-linear", 1)]  # fc2; fc1 has K=32 < 64
    assert torch.nn.functional.mse_loss(out, model(x)) < 1e-2


def test_attention_kernels_can_be_named_and_reads_the_target():
    """On the CPU the table keeps SDPA unless attention_kernel="flex"; the pass says which it chose."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))

    class Windowed(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(16)
            keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
            s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

    model = Windowed()
    _, out, records = compile_and_collect(model, (q, k, v), passes=["attention-to-sdpa", "attention-kernels"])
    names = [p.name for p in records[0].passes]
    assert names == ["attention-to-sdpa", "attention-kernels"], names
    assert records[0].passes[1].matches == 0  # SDPA kept on the CPU by default
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    _, out, records = compile_and_collect(model, (q, k, v), passes=["attention-to-sdpa", "attention-kernels"],
                                          attention_kernel="flex")
    assert records[0].passes[1].matches == 1  # FlexAttention spliced in
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-4, atol=1e-5)


def test_target_is_built_from_the_inputs_and_read_by_hand_in_tests():
    t = Target.of([torch.randn(2, requires_grad=True)], "inductor")
    assert t == Target(DeviceInfo("cpu"), training=True, lowering="inductor")
    with torch.no_grad():
        assert not Target.of([torch.randn(2, requires_grad=True)], "eager").training
    assert Target.of([torch.randn(2), 3], "xla") == Target(DeviceInfo("cpu"), training=False, lowering="xla")
