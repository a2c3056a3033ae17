"""``moe-dispatch`` in inference graphs for CUDA: ``kp::routed_experts_tables`` reads the expert weights through
address tables instead of 3 x E tensors per call (``passes/moe/tables.py``).

On the CPU the compile target is described as an H100 (``Target.of`` patched) so the pass takes its CUDA
decision path; the tables op then runs its reference on the weights the tables point at.
"""

import pytest
import torch

from kp_compiler.core.devices import DeviceInfo
from kp_compiler.core.target import Target
from kp_compiler.ops import routed_experts_tables
from kp_compiler.passes.moe.tables import RefreshTables
from kp_compiler.testing.models import LoopMoE
from kp_compiler.core.report import collect
from tests.utils import compile_and_collect, filecheck

D, FF, E, K = 16, 24, 4, 2
PASSES = ["noop-elimination", "moe-dispatch"]
TABLES = torch.ops.kp.routed_experts_tables.default
ROUTED = torch.ops.kp.routed_experts.default


@pytest.fixture(autouse=True)
def capture_loops():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


@pytest.fixture
def cuda_target(monkeypatch):
    """The backend decides as for an H100 (the lowering still runs on the CPU inputs)."""
    real = Target.of

    def as_cuda(example_inputs, lowering, gm=None):
        t = real(example_inputs, lowering, gm)
        return Target(DeviceInfo("cuda", (9, 0)), t.training, t.lowering, t.autocast)
    monkeypatch.setattr(Target, "of", staticmethod(as_cuda))


def _model():
    torch.manual_seed(0)
    return LoopMoE(D, FF, E, K)


def _ops(records) -> list:
    """The routed-experts op each graph's final pass output calls (from the record's dumped nodes)."""
    return [p.notes for r in records for p in r.passes if p.name == "moe-dispatch"]


def test_inference_graph_reads_weights_through_tables(cuda_target):
    model = _model()
    x = torch.randn(10, D)
    with torch.no_grad():
        compiled, out, records = compile_and_collect(model, (x,), passes=PASSES)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
        for _ in range(2):  # fresh inputs, the same compiled graph
            x2 = torch.randn(10, D)
            torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-6)
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "1 routed-experts op(s) read their weights through address tables" in notes
    assert records[0].passes[-1].matches == 1


def test_tables_dump(cuda_target, tmp_path):
    model = _model()
    with torch.no_grad():
        compile_and_collect(model, (torch.randn(10, D),), passes=PASSES, dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "02-moe-dispatch.txt").read_text()
    filecheck(
        "CHECK: after moe-dispatch | status ok | matches 1\n"
        "CHECK-NOT: kp.routed_experts.default\n"
        "CHECK: kp.routed_experts_tables.default(%l_x_, %getitem_1, %div, {{[0-9]+}}, 'silu') : f32[10, 16]"
        "  # 4 experts, gated silu, from an unrolled loop\n"
        "CHECK-NOT: index_add\n",
        text,
    )


def test_weights_updated_in_place_are_read_as_they_are(cuda_target):
    model = _model()
    x = torch.randn(10, D)
    with torch.no_grad():
        compiled, out, _ = compile_and_collect(model, (x,), passes=PASSES)
        for expert in model.experts:
            expert.down.weight.mul_(-2.0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(x), -2.0 * out, rtol=1e-5, atol=1e-6)


def test_reassigned_weight_is_followed(cuda_target, monkeypatch):
    """A parameter replaced by a new tensor (``load_state_dict(assign=True)``) is read at its new address:
    the same compiled graph, its tables re-pointed by the hook."""
    refreshed = []
    real = routed_experts_tables.ExpertTables.refresh
    monkeypatch.setattr(routed_experts_tables.ExpertTables, "refresh",
                        lambda self, *ws: (refreshed.append(1), real(self, *ws)))
    model = _model()
    x = torch.randn(10, D)
    with torch.no_grad():
        compiled, _, records = compile_and_collect(model, (x,), passes=PASSES)
        sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(sd, assign=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert refreshed == [1]  # once: the second call found the tables current


def test_training_graph_keeps_the_weight_lists(cuda_target):
    model = _model()
    x = torch.randn(10, D, requires_grad=True)
    compiled, out, records = compile_and_collect(model, (x,), passes=PASSES)
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "address tables" not in notes and records[0].passes[-1].matches == 1
    out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(ref_x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_cpu_target_keeps_the_weight_lists():
    model = _model()
    x = torch.randn(10, D)
    with torch.no_grad():
        _, out, records = compile_and_collect(model, (x,), passes=PASSES)
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "address tables" not in notes and records[0].passes[-1].matches == 1
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_verify_keeps_the_weights_it_tables(cuda_target):
    """With ``verify`` the rewrite is checked on random inputs; the tabled weights keep their values."""
    model = _model()
    x = torch.randn(10, D)
    with torch.no_grad():
        _, out, records = compile_and_collect(model, (x,), passes=PASSES, verify=True)
    rec = [p for p in records[0].passes if p.name == "moe-dispatch"][0]
    assert rec.status == "ok" and rec.matches == 1
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_refresh_rewrites_the_tables_in_place():
    ws = [[torch.randn(FF, D) for _ in range(E)] for _ in range(2)] + [[torch.randn(D, FF) for _ in range(E)]]
    handle = routed_experts_tables.make(torch.empty(1, D), *ws)
    entry = routed_experts_tables.entry(handle)
    gate, up, down = entry.tables
    args = [torch.randn(3, D), *ws[0], *ws[1], *ws[2]]
    hook = RefreshTables(handle, tuple(range(1, 1 + 3 * E)), (E, E, E))
    hook(args)  # nothing moved
    assert up.tolist() == [w.data_ptr() for w in ws[1]]
    moved = torch.randn(FF, D)
    args[1 + E + 2] = moved  # up weight of expert 2
    hook(args)
    assert entry.tables[1] is up and up[2].item() == moved.data_ptr()
    assert entry.weights()[1][2] is moved
    assert gate.tolist() == [w.data_ptr() for w in ws[0]]


def test_weights_the_kernels_cannot_read_get_no_tables():
    ws = [[torch.randn(FF, D) for _ in range(E)], [torch.randn(FF, D) for _ in range(E)],
          [torch.randn(D, FF)[:, :FF - 1] for _ in range(E)]]  # row stride fine, shapes differ from up's: ok
    ws[1][1] = torch.randn(FF, D + 1)[:, :D]  # row stride differs from the other experts'
    assert routed_experts_tables.make(torch.empty(1, D), *ws) is None
    stacked = [[torch.randn(E, FF, D)], [torch.randn(E, FF, D)], [torch.randn(E, D, FF)]]
    assert routed_experts_tables.make(torch.empty(1, D), *stacked) is None


def test_freed_weights_raise_on_the_reference_path():
    ws = [[torch.randn(FF, D) for _ in range(E)] for _ in range(2)] + [[torch.randn(D, FF) for _ in range(E)]]
    handle = routed_experts_tables.make(torch.empty(1, D), *ws)
    del ws
    with pytest.raises(RuntimeError, match="freed"):
        TABLES(torch.randn(3, D), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K), handle, "silu")


def test_unknown_handle_is_an_error():
    with pytest.raises(ValueError, match="no tables under handle"):
        TABLES(torch.randn(3, D), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K), 10**9, "silu")


def test_fused_kernels_rule_matches_the_lowering():
    from kp_compiler.lowering import moe
    for dev in (DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (8, 0)), DeviceInfo("cuda", (7, 5)),
                DeviceInfo("cpu"), DeviceInfo("xla")):
        assert routed_experts_tables.fused_kernels(dev) == (
            moe.choose(dev, torch.bfloat16, True, True, moe._HAS_TRITON) == "triton"), dev


def test_which_graphs_may_take_tables():
    from types import SimpleNamespace
    from kp_compiler.passes.moe.tables import why_not
    h100 = DeviceInfo("cuda", (9, 0))
    assert why_not(SimpleNamespace(target=Target(h100, training=False))) is None
    assert "backward" in why_not(SimpleNamespace(target=Target(h100, training=True)))
    assert "cpu" in why_not(SimpleNamespace(target=Target(DeviceInfo("cpu"), training=False)))
    assert "by hand" in why_not(None)


class _GradInside(LoopMoE):
    """Switches grad mode on inside the compiled region: a backward may run from its output."""

    def forward(self, x):
        with torch.enable_grad():
            return super().forward(x)


def test_a_graph_that_switches_grad_mode_keeps_the_weight_lists(cuda_target, tmp_path):
    torch.manual_seed(0)
    model = _GradInside(D, FF, E, K)
    x = torch.randn(10, D)
    with torch.no_grad():
        compiled, out, records = compile_and_collect(model, (x,), passes=PASSES, dump_dir=str(tmp_path))
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "address tables" not in notes
    dumps = " ".join(p.read_text() for p in tmp_path.rglob("*moe-dispatch.txt"))
    assert "routed_experts_tables" not in dumps


def test_tensor_subclass_weights_keep_the_weight_lists(cuda_target, monkeypatch):
    """A weight whose type is a tensor subclass (DTensor, a quantized tensor) is not read by address."""
    import kp_compiler.passes.moe.tables as tables
    model = _model()
    x = torch.randn(10, D)
    real = tables.context.PassContext.example_value

    class Sub(torch.Tensor):
        pass

    def as_subclass(self, node):
        v = real(self, node)
        return v.as_subclass(Sub) if isinstance(v, torch.Tensor) and "experts" in node.name else v
    monkeypatch.setattr(tables.context.PassContext, "example_value", as_subclass)
    with torch.no_grad():
        _, out, records = compile_and_collect(model, (x,), passes=PASSES)
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "tensor subclass" in notes
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(FF, D, generator=g) for _ in range(E)], [torch.randn(FF, D, generator=g) for _ in range(E)],
            [torch.randn(D, FF, generator=g) for _ in range(E)])


def test_weight_sets_switch_through_kept_device_copies():
    """Layers sharing one compiled graph: each switch is one copy into the same table, from a kept copy."""
    a, b = _weights(1), _weights(2)
    handle = routed_experts_tables.make(torch.empty(1, D), *a)
    entry = routed_experts_tables.entry(handle)
    table = entry.table
    for ws in (b, a, b, a):
        entry.refresh(*ws)
        assert entry.table is table and entry.readable
        assert entry.tables[1].tolist() == [w.data_ptr() for w in ws[1]]
        assert entry.tables[2].tolist() == [w.data_ptr() for w in ws[2]]
        assert entry.weights()[0][3] is ws[0][3]
    assert len(entry.known) == 2


def test_weights_moved_where_the_kernels_cannot_read_them_run_the_reference():
    a = _weights(1)
    handle = routed_experts_tables.make(torch.empty(1, D), *a)
    entry = routed_experts_tables.entry(handle)
    odd = torch.randn(FF * D + 1)[1:].view(FF, D)  # 4 bytes past a 16-byte boundary
    moved = (a[0], [odd, *a[1][1:]], a[2])
    with pytest.warns(RuntimeWarning, match="cannot read"):
        entry.refresh(*moved)
    assert not entry.readable and entry.weights()[1][0] is odd
    entry.refresh(*a)
    assert entry.readable and entry.tables[1][0].item() == a[1][0].data_ptr()


def test_two_layers_sharing_one_compiled_graph(cuda_target):
    """``torch.compile`` of a function given the layer: one graph serves both layers (their weights are its
    inputs); each call's tables follow the layer it was given."""
    torch.manual_seed(0)
    layers = [LoopMoE(D, FF, E, K) for _ in range(2)]
    compiled = torch.compile(lambda layer, x: layer(x), backend="kernelpytorch", options={"passes": PASSES})
    x = torch.randn(10, D)
    with torch.no_grad():
        for layer in (*layers, *layers):
            torch.testing.assert_close(compiled(layer, x), layer(x), rtol=1e-5, atol=1e-6)


def test_dynamic_token_count_one_graph_with_tables(cuda_target):
    """``dynamic=True``: one compile for three token counts, the tables op in it, outputs as eager."""
    model = _model()
    compiled = torch.compile(model, backend="kernelpytorch", options={"passes": PASSES}, dynamic=True)
    with torch.no_grad(), collect() as records:
        for t in (10, 7, 13):
            x = torch.randn(t, D)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(records) == 1
    notes = " ".join(n for ns in _ops(records) for n in ns)
    assert "read their weights through address tables" in notes
