"""``fp8-linear`` with delayed and static scaling under torch.compile: state, overflow events, calibration, caches."""

import copy

import pytest
import torch
from torch import nn

import kp_compiler
from kp_compiler.core.report import collect
from kp_compiler.ops.fp8_scaled import EVENTS, HISTORY, SCALE
from kp_compiler.ops import fp8_state, fp8_weights
from tests.utils import filecheck

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EMULATE = {"emulate": True, "min_dims": [16, 16, 16]}


class MLP(nn.Module):
    def __init__(self, d=32, f=64):
        super().__init__()
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def q(t, s, dtype=E4M3):
    top = torch.finfo(dtype).max
    return (t.float() / s).clamp(-top, top).to(dtype).float() * s


def compiled(model, lowering="inductor", **fp8):
    return torch.compile(model, backend="kernelpytorch",
                         options={"fp8": {**EMULATE, **fp8}, "strict": True, "lowering": lowering})


@pytest.mark.parametrize("lowering", ["inductor", "eager"])
def test_delayed_state_is_updated_by_every_forward_and_backward_under_compile(lowering):
    torch.manual_seed(0)
    model = MLP()
    run = compiled(model, lowering, recipe="delayed", history_len=3, margin=1)
    x_amax, g_amax = [], []
    for step in range(4):
        x = (torch.rand(48, 32) * 2 - 1) * (step + 1)
        x_amax.append(x.abs().amax().item())
        out = run(x.requires_grad_())
        grad = torch.randn_like(out)
        g_amax.append(grad.abs().amax().item())  # what reaches the down layer's backward
        out.backward(grad)
    up, down = fp8_state.find(model.up.weight), fp8_state.find(model.down.weight)
    assert up.recipe == "delayed" and up.history_len == 3
    torch.testing.assert_close(up.history("x"), torch.tensor(x_amax[::-1][:3]))
    assert up.x[SCALE].item() == pytest.approx(max(x_amax[1:]) / 448 * 2, rel=1e-6)
    torch.testing.assert_close(down.history("grad"), torch.tensor(g_amax[::-1][:3]))  # down sees the output gradient
    assert (up.history("w") > 0).all() and up.events() == {"x": 0, "w": 0, "grad": 0}


def test_delayed_forward_uses_the_previous_scale_with_micro_batches():
    torch.manual_seed(1)
    model = MLP()
    run = compiled(model, recipe="delayed", history_len=2)
    x1, x2 = torch.randn(48, 32), torch.randn(48, 32) * 10
    for x in (x1, x2):  # gradient accumulation: forward and backward per micro-batch
        run(x).sum().backward()
    state = fp8_state.find(model.up.weight)
    assert state.history("x").tolist() == pytest.approx([x2.abs().amax().item(), x1.abs().amax().item()])
    assert (state.history("grad") > 0).all()
    sx, sw = state.x[SCALE].clone(), state.w[SCALE].clone()
    with torch.no_grad():  # a new graph (grad mode is guarded) on the same state
        got = run(x1)
        up = q(x1, sx) @ q(model.up.weight, sw).t() + model.up.bias
    assert state.x[SCALE] == sx  # x1's amax is below the history's max: the scale stays
    torch.testing.assert_close(got, model.down(torch.relu(up)), rtol=0.05, atol=0.05)
    assert not torch.equal(got, model.down(torch.relu(up)))  # down is FP8 too, with its own delayed scale


def test_an_injected_inf_keeps_the_scale_gives_a_finite_result_and_is_counted_in_explain():
    torch.manual_seed(2)
    model = MLP()
    run = compiled(model, recipe="delayed", history_len=4)
    run(torch.randn(48, 32)).sum().backward()
    state = fp8_state.find(model.up.weight)
    before = state.x.clone()
    x = torch.randn(48, 32)
    x[3, 7] = float("inf")
    out = run(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.equal(state.x[HISTORY:], before[HISTORY:]) and state.x[SCALE] == before[SCALE]
    assert state.events()["x"] == 1 and state.x[EVENTS].item() == 1
    report = kp_compiler.explain(model, x, fp8={**EMULATE, "recipe": "delayed", "history_len": 4})
    assert torch.isfinite(report.output).all()
    assert report.fp8_events["up"]["x"] == 2
    assert "fp8 overflow events" in str(report) and "up: x=2 w=0 grad=" in str(report)


def test_dynamic_tensorwise_saturates_an_inf_instead_of_wiping_the_tensor():
    torch.manual_seed(3)
    model = MLP()
    x = torch.randn(48, 32)
    clean = compiled(model)(x)
    x[0, 0] = float("inf")
    out = compiled(model)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], clean[1:], rtol=0, atol=0)  # other rows keep their scale and values


def test_state_dict_round_trip_and_filecheck_of_the_dump(tmp_path):
    torch.manual_seed(4)
    model = MLP()
    run = torch.compile(model, backend="kernelpytorch", options={
        "fp8": {**EMULATE, "recipe": "delayed", "history_len": 2}, "dump_dir": str(tmp_path)})
    for _ in range(2):
        run(torch.randn(48, 32)).sum().backward()
    sd = kp_compiler.fp8.state_dict(model)
    assert set(sd) == {"up", "down"} and sd["up"]["history_len"] == 2
    other = copy.deepcopy(model)
    assert kp_compiler.fp8.state_dict(other) == {}  # state belongs to the weight objects
    kp_compiler.fp8.load_state_dict(other, sd)
    for role in ("x", "w", "grad"):
        torch.testing.assert_close(fp8_state.find(other.up.weight).rows()[role], sd["up"][role])
    with pytest.raises(KeyError, match="nope"):
        kp_compiler.fp8.load_state_dict(other, {"nope": sd["up"]})
    dump = open(next(tmp_path.glob("graph-*/*-fp8-linear.txt"))).read()
    filecheck("CHECK: kp.fp8_scale_update.default\nCHECK: kp.fp8_scale_update.default"
              "\nCHECK: kp.fp8_linear_scaled.default\nCHECK-SAME: 'delayed'\nCHECK-SAME: # fp8: converted, delayed"
              "\nCHECK: kp.fp8_linear_scaled.default\n", dump)


def test_static_calibration_freezes_activation_scales_and_requantizes_a_changed_weight():
    torch.manual_seed(5)
    model = MLP()
    uncalibrated = compiled(MLP(), recipe="static")
    with collect() as records, torch.no_grad():
        uncalibrated(torch.randn(48, 32))
    notes = [n for r in records for p in r.passes for n in p.notes]
    assert all("not calibrated" in n for n in notes) and len(notes) == 2
    torch._dynamo.reset()  # Dynamo would reuse that graph (and its state binding) for another MLP: see the docs
    batches = [torch.randn(48, 32) * s for s in (1.0, 2.0, 0.5)]
    amaxes = kp_compiler.fp8.calibrate(model, batches)
    assert amaxes["up"] == pytest.approx(max(b.abs().amax().item() for b in batches))
    sx = torch.tensor(amaxes["up"] / 448)
    run = compiled(model, recipe="static")
    x = torch.randn(48, 32) * 4  # past the calibrated range: saturates at the frozen scale
    with torch.no_grad():
        got = run(x)

        def want():
            up = q(x, sx) @ q(model.up.weight, model.up.weight.abs().amax() / 448).t() + model.up.bias
            h = torch.relu(up)
            dw = model.down.weight
            return q(h, torch.tensor(amaxes["down"] / 448)) @ q(dw, dw.abs().amax() / 448).t()

        torch.testing.assert_close(got, want(), rtol=1e-5, atol=1e-5)
        misses = fp8_weights.stats["misses"]
        run(x)
        assert fp8_weights.stats["misses"] == misses  # weights quantized once
        model.up.weight.mul_(3)  # a changed weight (version bump) is quantized again
        torch.testing.assert_close(run(x), want(), rtol=1e-5, atol=1e-5)
        assert fp8_weights.stats["misses"] == misses + 1
    assert fp8_state.find(model.up.weight).x[SCALE].item() == pytest.approx(amaxes["up"] / 448)


def test_dynamic_inference_caches_weights_and_training_does_not():
    torch.manual_seed(6)
    model = MLP()
    run = compiled(model)
    x = torch.randn(48, 32)
    fp8_weights.clear()
    with torch.no_grad():
        first = run(x)
        run(x)
        assert fp8_weights.stats == {"hits": 2, "misses": 2}
        model.down.weight.copy_(torch.randn_like(model.down.weight))
        changed = run(x)
    assert fp8_weights.stats == {"hits": 3, "misses": 3}
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, torch.ops.kp.fp8_linear(
        torch.relu(torch.ops.kp.fp8_linear(x, model.up.weight, model.up.bias, "tensorwise", E4M3, E5M2)),
        model.down.weight, None, "tensorwise", E4M3, E5M2).detach())
    run(x.requires_grad_()).sum().backward()
    assert fp8_weights.stats["misses"] == 3 and fp8_weights.stats["hits"] == 3  # training graphs never cache
