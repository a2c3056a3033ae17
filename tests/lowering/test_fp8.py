"""``fp8-linear``: which linears become ``kp::fp8_linear`` (size table, include/exclude), numerics vs eager."""

import pytest
import torch
from torch import nn

from kp_compiler.core.report import collect
from kp_compiler.core.devices import DeviceInfo, fp8_dtypes
from kp_compiler.core.fp8_options import FP8Options
from kp_compiler.passes.fp8.linear import SIZE_TABLE, thresholds
from kp_compiler.options import parse_options
from tests.utils import filecheck

H100, A100, ADA = DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (8, 0)), DeviceInfo("cuda", (8, 9))


class MLP(nn.Module):
    def __init__(self, d=32, f=64):
        super().__init__()
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d, bias=False)
        self.head = nn.Linear(d, 16, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def compile_with(model, x, **fp8):
    compiled = torch.compile(model, backend="kernelpytorch", options={"fp8": fp8, "strict": True})
    with collect() as records:
        out = compiled(x)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    return compiled, out, rec


@pytest.mark.parametrize("device,m,k,n,train,limits_known,convert", [
    (H100, 8192, 8192, 8192, True, True, True),      # 1.50x training, 1.59x inference (GPU time)
    (H100, 8192, 4096, 14336, True, True, True),     # 1.41x / 1.62x
    (H100, 4096, 4096, 4096, True, True, True),      # 1.14x / 1.26x
    (H100, 2048, 4096, 4096, True, True, False),     # training 1.00x: kept
    (H100, 2048, 4096, 4096, False, True, True),     # inference 1.22x: converted
    (H100, 1024, 4096, 14336, False, True, False),   # inference 1.46x, but 1.03x at 1024x4096x4096: M too small
    (H100, 4096, 4096, 1024, True, True, False),     # 0.80x training, 0.71x inference
    (H100, 1024, 1024, 1024, True, True, False),     # 5.6x slower (anchors)
    (H100, 16, 4096, 4096, False, True, False),      # decode: 2x slower (anchors)
    (A100, 8192, 8192, 8192, True, False, False),    # no FP8 tensor cores
    (ADA, 8192, 8192, 8192, True, False, False),     # FP8 exists, not measured: not converted
    (DeviceInfo("cpu"), 8192, 8192, 8192, True, False, False),
    (DeviceInfo("rocm", None, arch="gfx942"), 8192, 8192, 8192, True, False, False),  # fnuz formats, not measured
])
def test_size_table_decides_both_sides(device, m, k, n, train, limits_known, convert):
    """The H100 row, measured per shape in GPU time (bench/results/2026-11-24-h100-fp8-sizes.txt)."""
    limits = thresholds(device, emulate=False, min_dims=None, train=train)
    assert (limits is not None) == limits_known
    assert (limits is not None and m >= limits[0] and k >= limits[1] and n >= limits[2]) == convert
    assert SIZE_TABLE[(9, 0)] == {"inference": (2048, 4096, 4096), "training": (4096, 4096, 4096)}
    has_fp8 = device.kind == "cuda" and bool(fp8_dtypes(device))  # min_dims replaces the row where FP8 exists
    assert thresholds(device, emulate=False, min_dims=[1, 16, 16], train=train) == ((1, 16, 16) if has_fp8 else None)


def test_converted_above_the_threshold_kept_below_with_reasons(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 40, 32)  # M = 80 tokens
    # casts="ops": the training ops as they run in every lowering, so the inference op below gives the same bytes
    compiled = torch.compile(model, backend="kernelpytorch", options={
        "fp8": {"emulate": True, "min_dims": [64, 32, 32], "casts": "ops"}, "dump_dir": str(tmp_path)})
    with collect() as records:
        out = compiled(x)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    assert rec.matches == 2 and rec.by_rule == {"tensorwise": 2}
    notes = "\n".join(rec.notes)
    assert "up.weight: converted (M=80, K=32, N=64)" in notes
    assert "down.weight: converted (M=80, K=64, N=32)" in notes
    assert "head.weight: kept (M=80, K=32, N=16 below the size table's (64, 32, 32)" in notes
    # a training graph: the op that also returns the FP8 operands its backward reuses
    dump = open(next(tmp_path.glob("graph-*/*-fp8-linear.txt"))).read()
    filecheck("CHECK: kp.fp8_linear_train.default(%l_x_\nCHECK-SAME: float8_e4m3fn[32, 80]"
              "\nCHECK-NEXT: getitem({{.*}}, 0){{.*}}# fp8: converted, tensorwise (M=80, K=32, N=64)"
              "\nCHECK: kp.fp8_linear_train.default(%relu\nCHECK: aten.linear.default\nCHECK-SAME: # fp8: kept\n", dump)
    err = ((out - model(x)).norm() / model(x).norm()).item()
    assert 1e-4 < err < 0.1  # FP8 numerics, not the exact result
    # an inference graph (compiled under no_grad): the plain op, with its weight cache
    inference = tmp_path / "inference"
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"fp8": {"emulate": True, "min_dims": [64, 32, 32]}, "dump_dir": str(inference)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out, rtol=0, atol=0)
    dump = open(next(inference.glob("graph-*/*-fp8-linear.txt"))).read()
    filecheck("CHECK: kp.fp8_linear.default(%l_x_{{.*}}, True)\nCHECK: kp.fp8_linear.default\nCHECK-NOT: fp8_linear_train", dump)


def test_include_exclude_and_training_gradients_match_the_emulated_reference():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(80, 32)
    compiled, out, rec = compile_with(model, x, emulate=True, min_dims=[16, 16, 16], exclude=["*head*"],
                                      include=["up.*", "head.*"], recipe="rowwise")
    notes = "\n".join(rec.notes)
    assert rec.by_rule == {"rowwise": 1}
    assert "up.weight: converted" in notes
    assert "down.weight: kept (not in options['fp8']['include'])" in notes
    assert "head.weight: kept (in options['fp8']['exclude'])" in notes
    x = torch.randn(80, 32, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    got = compiled(x)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    h = torch.relu(torch.ops.kp.fp8_linear(ref_x, model.up.weight, model.up.bias, "rowwise", e4, e5))
    ref = model.head(model.down(h))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), [x, *params]), torch.autograd.grad(ref.sum(), [ref_x, *params])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_fp8_on_the_device_nothing_is_converted_and_each_linear_says_why():
    model, x = MLP(), torch.randn(8, 32)
    _, out, rec = compile_with(model, x)
    assert rec.matches == 0 and len(rec.notes) == 3
    assert all("no FP8 size table for cpu" in n for n in rec.notes)
    torch.testing.assert_close(out, model(x))


def test_fp8_options_are_checked():
    assert parse_options(options={"fp8": True}).fp8 == FP8Options()
    assert parse_options(options={"fp8": None}).fp8 is None
    assert parse_options(options={"fp8": {"fuse_gated": True}}).fp8.fuse_gated and not FP8Options().fuse_gated
    assert parse_options(options={"fp8": {"recipe": "delayed", "history_len": 4, "margin": 1}}).fp8.history_len == 4
    for bad, msg in [({"recipe": "blockwise"}, "fp8 recipe"), ({"exclude": "head"}, "list of glob"),
                     ({"min_dims": [1, 2]}, "three positive ints"), ({"scale": 1}, "unknown key"),
                     ({"recipe": "delayed", "history_len": 0}, "history_len"),
                     ({"recipe": "delayed", "history_len": True}, "history_len"),
                     ({"recipe": "delayed", "margin": -1}, "margin"),
                     ({"recipe": "tensorwise", "margin": 1}, "applies to recipe 'delayed' only"),
                     ({"recipe": "static", "history_len": 4}, "applies to recipe 'delayed' only"),
                     ({"emulate": "yes"}, "emulate"), ({"fast_accum": 1}, "fast_accum"),
                     ({"fuse_gated": "no"}, "fuse_gated")]:
        with pytest.raises(ValueError, match=msg):
            parse_options(options={"fp8": bad})


def test_explain_lists_every_linear_decision():
    import kp_compiler

    report = str(kp_compiler.explain(MLP(), torch.randn(80, 32), fp8={"emulate": True, "min_dims": [64, 64, 32]}))
    assert "fp8-linear" in report
    assert "down.weight: converted (M=80, K=64, N=32)" in report
    assert "up.weight: kept (M=80, K=32, N=64 below" in report and "head.weight: kept" in report


def test_tensorwise_training_graph_gradients_equal_the_eager_op():
    """Compiled with grad enabled, the default recipe runs ``kp::fp8_linear_train``: same output and gradients as
    ``kp::fp8_linear`` written into the model by hand (the backward reuses the forward's FP8 operands)."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 40, 32, requires_grad=True)
    compiled, out, rec = compile_with(model, x, emulate=True, min_dims=[16, 16, 16], casts="ops")
    assert rec.by_rule == {"tensorwise": 3}
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    ref_x = x.detach().clone().requires_grad_()
    lin = torch.ops.kp.fp8_linear
    h = torch.relu(lin(ref_x, model.up.weight, model.up.bias, "tensorwise", e4, e5))
    ref = lin(lin(h, model.down.weight, None, "tensorwise", e4, e5), model.head.weight, None, "tensorwise", e4, e5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(out, [x, *params], grad), torch.autograd.grad(ref, [ref_x, *params], grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fast_accumulation_is_the_forward_default_and_can_be_turned_off(tmp_path):
    """The forward GEMM gets ``fast_accum`` (``torch._scaled_mm``'s ``use_fast_accum``) unless the option says no;
    the emulation accumulates in fp32 either way, so the outputs agree."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(80, 32)
    outs = []
    for fast in (None, False):
        opts = {"emulate": True, "min_dims": [16, 16, 16], **({} if fast is None else {"fast_accum": fast})}
        dump_dir = tmp_path / str(fast)
        compiled = torch.compile(model, backend="kernelpytorch", options={"fp8": opts, "dump_dir": str(dump_dir)})
        outs.append(compiled(x))
        dump = open(next(dump_dir.glob("graph-*/*-fp8-linear.txt"))).read()
        want = "True" if fast is None else "False"
        filecheck(f"CHECK: kp.fp8_linear_train.default(%l_x_{{{{.*}}}}, torch.float8_e5m2, {want})", dump)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_training_linears_that_read_one_input_cast_it_once(tmp_path):
    """A SwiGLU MLP's gate and up read one x: one ``kp.fp8_cast_pair`` feeds both; down keeps its own op
    (``fuse_gated=False``: without the gated MLP's fusion, tests/lowering/test_fp8_gated.py).
    Outputs and gradients equal the per-linear ops' (the same bytes, cast once)."""
    from kp_compiler.testing.models import SwiGLU

    torch.manual_seed(0)
    model, x = SwiGLU(32, 64), torch.randn(2, 40, 32, requires_grad=True)
    compiled = torch.compile(model, backend="kernelpytorch",
                             options={"fp8": {"emulate": True, "min_dims": [16, 16, 16], "fuse_gated": False},
                                      "dump_dir": str(tmp_path)})
    out = compiled(x)
    dump = open(next(tmp_path.glob("graph-*/*-fp8-linear.txt"))).read()
    filecheck("CHECK-COUNT-1: kp.fp8_cast_pair.default(%l_x_\nCHECK: kp.fp8_linear_shared.default(%l_x_"
              "\nCHECK: input cast shared\nCHECK: kp.fp8_linear_shared.default(%l_x_\nCHECK: kp.fp8_linear_train.default"
              "\nCHECK-NOT: fp8_cast_pair", dump)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    ref_x = x.detach().clone().requires_grad_()

    def lin(t, w):
        return torch.ops.kp.fp8_linear_train(t, w, None, e4, e5)[0]

    ref = lin(torch.nn.functional.silu(lin(ref_x, model.gate.weight)) * lin(ref_x, model.up.weight), model.down.weight)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ref)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(out, [x, *params], grad), torch.autograd.grad(ref, [ref_x, *params], grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class QKV(nn.Module):
    """An attention block's projections: q at the size table, k and v (GQA) below it in N."""

    def __init__(self, d=64, kv=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False), nn.Linear(d, kv, bias=False)
        self.solo = nn.Linear(d, kv, bias=False)

    def forward(self, x, y):
        return self.q(x).sum(-1) + self.k(x).sum(-1) + self.v(x).sum(-1) + self.solo(y).sum(-1)


def test_training_linears_below_the_table_in_n_convert_beside_a_converted_reader(monkeypatch):
    """K and V read the input Q converts, so their input cast is shared: they convert from SHARED_MIN_N;
    a linear of the same shape on another input, and every linear of an inference graph, stay in bf16."""
    from kp_compiler.passes.fp8 import linear as fp8_lowering

    monkeypatch.setitem(fp8_lowering.SIZE_TABLE, (9, 0), {"inference": (16, 64, 64), "training": (16, 64, 64)})
    monkeypatch.setitem(fp8_lowering.SHARED_MIN_N, (9, 0), 16)
    torch.manual_seed(0)
    model, x, y = QKV(), torch.randn(80, 64, requires_grad=True), torch.randn(80, 64)
    compiled = torch.compile(model, backend="kernelpytorch", options={"fp8": {"emulate": True}, "strict": True})
    with collect() as records:
        out = compiled(x, y)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    notes = "\n".join(rec.notes)
    assert rec.by_rule == {"tensorwise": 3}
    assert "q.weight: converted (M=80, K=64, N=64)" in notes
    assert "k.weight: converted (M=80, K=64, N=16: below the size table's N, input cast shared" in notes
    assert "solo.weight: kept (M=80, K=64, N=16 below the size table's (16, 64, 64)" in notes
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch._dynamo.reset()
    with torch.no_grad(), collect() as records:
        torch.compile(model, backend="kernelpytorch", options={"fp8": {"emulate": True}})(x, y)
    (rec,) = [p for r in records for p in r.passes if p.name == "fp8-linear"]
    assert rec.by_rule == {"tensorwise": 1}  # inference graphs share no casts: q only


def test_not_under_autocast():
    """Under ``torch.autocast`` the FP8 ops would take the fp32 activations and return fp32 where eager's linears
    return bf16 (the pass was rolled back by the verifier before): it does not apply, and says why."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(80, 32)
    compiled = torch.compile(model, backend="kernelpytorch", options={"fp8": {"emulate": True, "min_dims": [16, 16, 16]}})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with collect() as records:
            got = compiled(x)
        want = model(x)
    reasons = [s["reason"] for r in records for s in r.skipped if s["pass"] == "fp8-linear"]
    assert reasons and "torch.autocast is on" in reasons[0]
    assert not [f for r in records for f in r.fallbacks] and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _dynamic_run(casts: str, train: bool = True):
    """SwiGLU under ``dynamic=True`` at four token counts: (records, relative errors vs eager per call)."""
    from kp_compiler.testing.models import SwiGLU

    torch.manual_seed(6)
    model = SwiGLU(32, 64)
    compiled = torch.compile(model, backend="kernelpytorch", dynamic=True, options={
        "fp8": {"emulate": True, "min_dims": [16, 16, 16], "casts": casts}, "strict": True})
    errors = []
    with collect() as records, torch.set_grad_enabled(train):
        for m in (40, 48, 37, 64):
            x = torch.randn(m, 32, requires_grad=train)
            out = compiled(x)
            ref_x = x.detach().clone().requires_grad_(train)
            ref = model(ref_x)
            err = [((out - ref).norm() / ref.norm()).item()]
            if train:
                out.square().mean().backward()
                ref.square().mean().backward()
                err.append(((x.grad - ref_x.grad).norm() / ref_x.grad.norm()).item())
            errors.append(err)
    return records, errors


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
def test_a_dynamic_token_count_converts_once_without_a_guard(train):
    """M symbolic: the size table is read at the example's M, without a guard; one graph serves every size."""
    records, errors = _dynamic_run("ops", train)
    assert len(records) == 1, [r.id for r in records]  # no recompile
    (rec,) = [p for p in records[0].passes if p.name == "fp8-linear"]
    assert rec.by_rule == {"tensorwise": 3}
    assert all("(M symbolic: the example's)" in n for n in rec.notes), rec.notes
    assert records[0].guards_added == [], records[0].guards_added
    for err in errors:
        assert 1e-4 < err[0] < 0.1 and all(e < 0.2 for e in err[1:]), errors
