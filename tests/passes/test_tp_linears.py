"""``passes/tp_linears.py``: tensor-parallel linears computed on their local shards, in one process (a 1-rank gloo
group: the chains Dynamo captures are those of any world size; ``tests/distributed/test_gloo.py`` runs 2 ranks).

The column- and row-parallel chains become local ``linear`` + ``kp::tp_copy`` / ``kp::tp_reduce`` (q, k and v
share one copy of their input), the graph is one plain part, every pass sees the linears (``fp8-linear``
converts them), and training equals eager; chains that are not these two (an all-gathered output, a DTensor
output, a sequence-parallel input) stay DTensor ops with their reason; an in-place write between two readers
of one input gives the later reader a copy of its own."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import FileCheck

from kp_compiler.core.report import collect

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


@pytest.fixture(scope="module")
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _tp_gpt(mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tests.distributed import worker
    model = worker.build()
    plan = {f"attn.{p}": ColwiseParallel() for p in "qkv"}
    plan.update({"attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    return model


def _grads(model):
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in model.named_parameters()}


def _train_both(build, x_of, options=None):
    """(eager out, compiled out, eager grads, compiled grads, records) for one forward/backward from one seed."""
    outs, grads = [], []
    torch.manual_seed(3)
    x = x_of()
    with collect() as records:
        for compiled in (False, True):
            torch._dynamo.reset()
            model = build()
            fn = torch.compile(model, backend="kernelpytorch", options=options) if compiled else model
            out = fn(x)
            out.float().square().mean().backward()
            outs.append(out.detach())
            grads.append(_grads(model))
    return outs, grads, records


def _assert_equal(outs, grads, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=rtol, atol=atol, msg=name)


def test_colwise_and_rowwise_linears_become_local_and_train_as_eager(mesh):
    outs, grads, records = _train_both(lambda: _tp_gpt(mesh), lambda: torch.randint(0, 64, (2, 16)))
    _assert_equal(outs, grads)
    (record,) = records
    assert not record.fallbacks, record.fallbacks
    local = record.parts["local_linears"]
    # per block: q, k, v, fc1 column-parallel (q, k, v share one input copy), proj and fc2 row-parallel
    assert (local["colwise"], local["rowwise"], local["copies"], local["kept"]) == (8, 4, 4, []), local
    assert record.parts["plain"] == 1 and record.parts["rewritten"] == 1, record.parts  # one part on plain tensors
    fired = [(p.name, p.matches) for p in record.passes if p.matches]
    assert fired == [("attention-to-sdpa", 2)], fired
    from kp_compiler.explain import _graph_lines
    assert ("  tensor-parallel linears computed on local shards: 8 column-parallel, 4 row-parallel (4 shared input "
            "copies)") in _graph_lines(0, record)


def test_the_localized_graph_holds_local_linears_and_the_collectives(mesh):
    (local,) = _localized(_tp_gpt(mesh), torch.randint(0, 64, (2, 16)))
    code = local.gm.code
    for name in ("from_local", "redistribute"):
        FileCheck().check_not(name).run(code)
    FileCheck().check_count("kp.tp_copy", 4, exactly=True).check_not("kp.tp_copy").run(code)
    FileCheck().check_count("kp.tp_reduce", 4, exactly=True).run(code)
    # every weight's and bias's shard is read once, before the first computation
    FileCheck().check_count(".to_local()", 24, exactly=True).check("embedding").check_not(".to_local()").run(code)


def test_fp8_converts_the_sharded_linears(mesh):
    fp8 = {"fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*"]}}
    outs, grads, records = _train_both(lambda: _tp_gpt(mesh), lambda: torch.randint(0, 64, (2, 16)), fp8)
    (record,) = records
    fired = {p.name: (p.matches, dict(p.by_rule)) for p in record.passes if p.matches}
    assert fired.get("fp8-linear") == (12, {"tensorwise": 12}), fired  # all six linears of both blocks
    notes = [n for p in record.passes if p.name == "fp8-linear" for n in p.notes]
    assert any("blocks.0.mlp.fc1.weight" in str(n) for n in notes), notes  # module paths read through the shard
    assert not torch.allclose(outs[1], outs[0], rtol=1e-6, atol=0)  # FP8 changed the numbers ...
    _assert_equal(outs, grads, rtol=5e-2, atol=5e-2)  # ... by FP8 rounding


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _plans():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {
        "all-gathered output": {"fc1": ColwiseParallel(output_layouts=Replicate())},
        "DTensor output": {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()},
        "sequence-parallel input": {"fc1": ColwiseParallel(input_layouts=Shard(1)), "fc2": RowwiseParallel()},
    }


def _localized(model, x) -> list:
    """``localize`` of every graph Dynamo captures from ``model(x)``."""
    from kp_compiler.passes.tp_linears import localize

    seen = []

    def capture(gm, example_inputs):
        seen.append(localize(gm, example_inputs))
        return gm
    torch._dynamo.reset()
    torch.compile(model, backend=capture)(x)
    return seen


@pytest.mark.parametrize("case", ["all-gathered output", "DTensor output", "sequence-parallel input"])
def test_other_plans_train_as_eager(mesh, case):
    """Plans beyond the column/row pair: an output gathered whole becomes local + ``kp::tp_all_gather``, a
    token-sharded input ``kp::sp_all_gather``; a DTensor output stays a DTensor op."""
    from torch.distributed.tensor.parallel import parallelize_module

    def build():
        torch.manual_seed(0)
        return parallelize_module(_MLP(), mesh, _plans()[case])
    outs, grads, records = _train_both(build, lambda: torch.randn(2, 8, 16), {"passes": ["noop-elimination"]})
    _assert_equal(outs, grads)
    # lowered as captured at worst ("DTensor output": no part computes on plain tensors), never a failure
    assert records and not any("failed" in f for r in records for f in r.fallbacks), [r.fallbacks for r in records]
    (local,) = _localized(build(), torch.randn(2, 8, 16))
    kept = " ".join(local.kept)
    if case == "all-gathered output":  # fc1's output gathered whole (an LM head's plan): local, then gathered
        assert (local.colwise, local.rowwise, local.kept) == (1, 0, []), local
        FileCheck().check("kp.tp_copy").check("linear").check_count("kp.tp_all_gather", 1, exactly=True).run(
            local.gm.code)
    elif case == "DTensor output":  # fc1's output stays a DTensor (no to_local); fc2 reads it, not a from_local
        assert (local.gm, local.colwise, local.rowwise, len(local.kept)) == (None, 0, 0, 2), local
        assert "not only read by to_local()" in kept and "neither a from_local nor a gather" in kept, kept
    else:  # sequence parallelism: fc1 reads its token-sharded input gathered, fc2 is row-parallel
        assert (local.colwise, local.rowwise, local.kept) == (1, 1, []), local
        FileCheck().check_count("kp.sp_all_gather", 1, exactly=True).check("kp.tp_reduce").run(local.gm.code)


class _Rewritten(nn.Module):
    """Two column-parallel linears read one input, written in place between them."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = x * 1.5
        a = self.q(h)
        h.mul_(2.0)
        return a + self.k(h)


def test_an_input_written_between_two_readers_is_copied_for_each(mesh):
    """Forward only: in training the write would change a tensor saved for the backward (the plain module
    raises; under DTensor eager the backward silently reads the written values)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = parallelize_module(_Rewritten(), mesh, {"q": ColwiseParallel(), "k": ColwiseParallel()})
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        with collect() as records:
            got = torch.compile(model, backend="kernelpytorch", options={"passes": ["noop-elimination"]})(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # one shared copy would give k the unwritten h
    locals_ = [r.parts["local_linears"] for r in records if r.parts and r.parts["local_linears"]]
    assert [(x["colwise"], x["copies"]) for x in locals_] == [(2, 2)], locals_


def test_fp8_inference_on_shards_sees_an_updated_weight(mesh):
    """An in-place update of a DTensor parameter bumps the DTensor's version, not its local shard's: a weight
    cached by the shard's version would go stale. Inference graphs quantize a shard on every call, so the
    compiled model follows the update (eager's output, within FP8 rounding)."""
    model = _tp_gpt(mesh)
    idx = torch.randint(0, 64, (2, 16))
    fp8 = {"fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*"]}}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", options=fp8)
    with torch.no_grad(), collect() as records:
        before = compiled(idx)
        model.blocks[0].mlp.fc1.weight.mul_(0.0)
        expected, after = model(idx), compiled(idx)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=5e-2, atol=5e-2)
    notes = [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
    assert sum("quantized on every call" in n for n in notes) == 12, notes


def test_stateful_fp8_recipes_leave_shards_in_bf16(mesh):
    fp8 = {"fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*"], "recipe": "delayed"}}
    torch._dynamo.reset()
    with collect() as records:
        torch.compile(_tp_gpt(mesh), backend="kernelpytorch", options=fp8)(torch.randint(0, 64, (2, 16)))
    notes = [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
    assert sum("a tensor-parallel shard: the delayed recipe" in n for n in notes) == 12, notes
    assert not any(p.matches for r in records for p in r.passes if p.name == "fp8-linear")


def test_torchtitan_sequence_parallel_plan_gathers_once_per_module(mesh):
    """torchtitan's plan (``tests/distributed/sp_model.py``): per block, q, k, v share one gather of the
    token-sharded norm output and w1, w3 another; wo and w2 reduce-scatter; the LM head reads the final norm's
    output gathered and its output columns are gathered whole (``kp::tp_all_gather``)."""
    from tests.distributed.sp_model import Llama, parallelize

    torch.manual_seed(0)
    (local,) = _localized(parallelize(Llama(), mesh), torch.randint(0, 64, (2, 16)))
    assert (local.colwise, local.rowwise, local.scatters, local.copies, local.kept) == (11, 4, 4, 0, []), local
    code = local.gm.code
    FileCheck().check_count("kp.sp_all_gather", 5, exactly=True).run(code)
    FileCheck().check_count("kp.tp_all_gather", 1, exactly=True).run(code)
    FileCheck().check_count("kp.sp_reduce_scatter", 4, exactly=True).run(code)
    FileCheck().check_not("kp.tp_copy").run(code)


# Models a review built against the first version (each was wrong or not localized then): what the graph does
# between and around the sharded linears (grad-mode blocks, in-place writes, linears reading linears, autocast).
class _NoGradReader(nn.Module):  # the first reader of h under no_grad: a shared copy would carry no gradient
    def __init__(self):
        super().__init__()
        self.pre, self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.pre(x)
        with torch.no_grad():
            a = self.q(h)
        return a + self.k(h)


class _EnableGrad(_MLP):  # called under no_grad: shards read at the top would be detached
    def forward(self, x):
        with torch.enable_grad():
            return super().forward(x)


class _InPlaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = x - 0.5
        a = self.q(h)
        F.relu(h, inplace=True)
        return a + self.k(h)


class _WriteThroughView(_InPlaceRelu):
    def forward(self, x):
        h = x * 1.5
        a = self.q(h)
        h.view(-1).mul_(2.0)
        return a + self.k(h)


class _Chained(nn.Module):  # column-parallel straight into row-parallel into column-parallel
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _review_cases():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    qk = {"q": ColwiseParallel(), "k": ColwiseParallel()}
    mlp = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    return {  # model, plan, train, context, (column-, row-parallel) localized
        "no_grad reader": (_NoGradReader, qk, True, None, (2, 0)),
        "enable_grad under no_grad": (_EnableGrad, mlp, True, torch.no_grad, (1, 1)),
        "relu inplace between": (_InPlaceRelu, qk, False, torch.no_grad, (2, 0)),
        "write through a view": (_WriteThroughView, qk, False, torch.no_grad, (2, 0)),
        "chained linears": (_Chained, {"a": ColwiseParallel(), "b": RowwiseParallel(), "c": ColwiseParallel()},
                            True, None, (2, 1)),
        "autocast bf16": (_MLP, mlp, True, lambda: torch.autocast("cpu", torch.bfloat16), (1, 1)),
    }


@pytest.mark.parametrize("case", ["no_grad reader", "enable_grad under no_grad", "relu inplace between",
                                  "write through a view", "chained linears", "autocast bf16"])
def test_the_graph_around_the_linears_is_respected(mesh, case):
    import contextlib

    from torch.distributed.tensor.parallel import parallelize_module

    model_cls, plan, train, context, expected = _review_cases()[case]
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = parallelize_module(model_cls(), mesh, plan)
        fn = torch.compile(model, backend="kernelpytorch",
                           options={"passes": ["noop-elimination"], "strict": True}) if compiled else model
        with collect() as records:
            with (context or contextlib.nullcontext)():
                out = fn(x.clone())
            if train:
                out.float().sum().backward()
        results.append((out.detach(), _grads(model) if train else {}, records))
    (out0, grads0, _), (out1, grads1, records) = results
    bf16 = out0.dtype == torch.bfloat16
    assert out1.dtype == out0.dtype
    tol = dict(rtol=1.6e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1, out0, **tol)
    for name, g in grads0.items():
        assert (g is None) == (grads1[name] is None), name  # a gradient on one side only is a failure
        if g is not None:
            torch.testing.assert_close(grads1[name].float(), g.float(), **tol, msg=name)
    locals_ = [r.parts["local_linears"] for r in records if r.parts and r.parts["local_linears"]]
    assert [(x["colwise"], x["rowwise"]) for x in locals_] == [expected], locals_


class _TwoRegions(nn.Module):
    """One tensor-parallel MLP run twice, the second time in an ``enable_grad`` block: its shards are read once
    per grad-mode region, and both reads must be known as shards."""

    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        a = self.mlp(x)
        with torch.enable_grad():
            b = self.mlp(x)
        return a + b.detach()


def test_shards_read_in_two_grad_mode_regions_are_both_shards_for_fp8(mesh):
    """Inference under ``no_grad``: the shards of both regions are quantized on every call (an in-place weight
    update is then seen: a cached quantization would not see it) and the ``exclude`` globs match both."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = parallelize_module(_TwoRegions(), mesh, {"mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    with torch.no_grad():  # called under no_grad, the enable_grad block is a region of its own
        (local,) = _localized(model, torch.randn(2, 4, 16))
    names = sorted(n.name for n in local.gm.graph.nodes if "tp_local" in n.name)
    per_linear = ["bias__tp_local", "bias__tp_local_r1", "weight__tp_local", "weight__tp_local_r1"]
    assert [n.rsplit("_parameters_", 1)[1] for n in names] == per_linear * 2, names  # fc1's, then fc2's
    fp8 = {"fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*fc2.weight"]}}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernelpytorch", options=fp8)
    x = torch.randn(2, 4, 16)
    with torch.no_grad(), collect() as records:
        compiled(x)
        model.mlp.fc1.weight.mul_(0.5)
        expected, got = model(x), compiled(x)
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
    notes = [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
    assert sum("mlp.fc1.weight: converted" in n for n in notes) == 2, notes  # one per region
    assert sum("mlp.fc2.weight: kept (in options['fp8']['exclude'])" in n for n in notes) == 2, notes
    assert sum("quantized on every call" in n for n in notes) == 2, notes


def _side_by_side(compiled, model, eager_model, batches) -> None:
    """Forward and backward of every batch through ``compiled`` and ``eager_model``: outputs equal at each batch,
    then the accumulated gradients equal (a gradient ``None`` on one side fails)."""
    for idx in batches:
        out, expected = compiled(idx), eager_model(idx)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        expected.square().mean().backward()
    grads, eager_grads = _grads(model), _grads(eager_model)
    for name, g in eager_grads.items():
        assert g is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_a_dynamic_batch_stays_dynamic(mesh):
    """A batch marked dynamic: one compile for three batch sizes, the linears localized, no guard on the size,
    training equal to eager at each size."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, model = _tp_gpt(mesh), _tp_gpt(mesh)
    compiled = torch.compile(model, backend="kernelpytorch")
    batches = [torch.randint(0, 64, (batch, 16)) for batch in (2, 3, 5)]
    for idx in batches:
        torch._dynamo.mark_dynamic(idx, 0)
    with collect() as records:
        _side_by_side(compiled, model, eager_model, batches)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    (record,) = records
    assert record.parts["local_linears"]["colwise"] == 8 and record.parts["local_linears"]["rowwise"] == 4
    assert not record.guards_added, record.guards_added


def _train_llama(mesh, dynamic, passes) -> list:
    """transformers' ``LlamaForCausalLM`` (2 layers, sdpa, grouped KV heads), each layer parallelized with torch's
    styles by the config's ``base_model_tp_plan``, one loss and backward eagerly and compiled with ``passes``:
    ``[(loss, grads, records)]`` for eager, then compiled."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="sdpa")
    style = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}

    def build():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        for layer in model.model.layers:
            parallelize_module(layer, mesh, {k.removeprefix("layers.*."): style[v]()
                                             for k, v in config.base_model_tp_plan.items()})
        return model
    ids = torch.randint(0, 64, (2, 16))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build()
        fn = model if not compiled else torch.compile(
            model, backend="kernelpytorch", dynamic=dynamic, options={"passes": passes})
        with collect() as records:
            loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), _grads(model), records))
    return results


@pytest.mark.parametrize("dynamic", [None, True])
def test_transformers_llama_under_its_own_tp_plan(mesh, dynamic):
    """transformers' ``LlamaForCausalLM`` (sdpa attention, grouped KV heads), each layer parallelized with torch's
    styles by the config's ``base_model_tp_plan``: every projection localized, loss and every gradient equal to
    eager, also with ``dynamic=True``. (The cut graph's parts used to keep make_fx's tensor constants as buffers,
    which AOTAutograd refused: the whole graph then fell back.)"""
    (loss0, grads0, _), (loss1, grads1, records) = _train_llama(mesh, dynamic, ["noop-elimination"])
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name, g in grads0.items():
        assert g is not None and grads1[name] is not None, name
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert not any(r.fallbacks for r in records), [r.fallbacks for r in records]
    local = [r.parts["local_linears"] for r in records if r.parts]
    # per layer: q, k, v, gate, up column-parallel (q, k, v share one copy; gate, up another), o and down row-parallel
    assert [(x["colwise"], x["rowwise"], x["copies"]) for x in local] == [(10, 4, 4)], local


@pytest.mark.parametrize("listed", [True, False], ids=["passes-listed", "default"])
def test_transformers_own_tp_under_dynamic_shapes(mesh, listed):
    """transformers' own tensor parallelism (its styles and the model's ``tp_plan``, as ``from_pretrained(tp_plan=
    "auto")`` applies them), run over three sequence lengths with the default ``dynamic=None``: the second length
    recompiles with symbolic sizes, and its row-parallel inputs become ``from_local(shape=(s0, s1, 64), stride=(
    s1*64, 64, 1))`` with graph nodes for the sizes. They are compared with the default layout as expressions (no
    guard), so all 11 column- and 4 row-parallel linears stay local in both graphs, and every call equals eager.
    Before, the 4 row-parallel linears stayed DTensor ops, and on torch 2.13 AOTAutograd then recursed without end
    tracing their backward (Inductor alone fails the same way).

    With the default options nothing in this model is the passes' (its attention is SDPA already), so each graph
    is lowered as captured; where that fails (torch 2.13's recursion, in the dynamic graph) the backend computes
    the sharded linears locally instead and lowers that (``parts["rescued"]`` says so)."""
    from torch._dynamo.utils import counters

    from tests.distributed import worker
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    counters.clear()
    eager_model, model = worker.build_hf_tp(mesh), worker.build_hf_tp(mesh)
    options = {"passes": ["noop-elimination"]} if listed else None
    compiled = torch.compile(model, backend="kernelpytorch", options=options)
    # automatic dynamic, as users get it (torch_xla's import turns it off: the torch 2.9 lane imports it)
    with collect() as records, torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        _side_by_side(compiled, model, eager_model,
                      [torch.randint(0, worker.VOCAB, (2, length)) for length in (16, 12, 8)])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # static, then one dynamic graph
    assert not any(r.fallbacks for r in records), [r.fallbacks for r in records]
    assert not any(r.guards_added for r in records), [r.guards_added for r in records]
    if listed:
        local = [r.parts["local_linears"] for r in records]
        assert [(x["colwise"], x["rowwise"], x["kept"]) for x in local] == [(11, 4, [])] * 2, local
    else:  # lowered as captured, or with every sharded linear local (rescued, or a pass had something to look at)
        for r in records:
            assert r.parts is None or r.parts["local_linears"]["kept"] == [], r.parts


def test_a_failed_lowering_of_a_dtensor_graph_is_rescued_by_local_linears(mesh, monkeypatch):
    """With nothing for the passes, a tensor-parallel graph is lowered as captured; where that lowering fails (as
    torch 2.13's does on transformers' row-parallel linears under dynamic sizes; here made to fail for every
    graph holding a DTensor linear), the sharded linears are computed locally and the graph is lowered in parts:
    training equals eager, and the record says what happened."""
    from kp_compiler import backend
    from kp_compiler.core.plain_regions import dtensor_type
    from tests.distributed import worker
    pytest.importorskip("transformers")

    real = backend.lower

    def failing(kind, gm, example_inputs, *args, **kwargs):
        if any(n.target in (F.linear, torch._C._nn.linear) and isinstance(n.meta.get("example_value"), dtensor_type())
               for n in gm.graph.nodes):
            raise RecursionError("maximum recursion depth exceeded")
        return real(kind, gm, example_inputs, *args, **kwargs)
    monkeypatch.setattr(backend, "lower", failing)
    # nothing for the passes (so on torch 2.13; torch 2.9's spelling of this graph holds an attention anchor)
    monkeypatch.setattr(backend, "idle_reason", lambda *args, **kwargs: "the graph has nothing (test)")
    eager_model, model = worker.build_hf_tp(mesh), worker.build_hf_tp(mesh)
    with collect() as records:
        _side_by_side(torch.compile(model, backend="kernelpytorch"), model, eager_model,
                      [torch.randint(0, worker.VOCAB, (2, 16))])
    (record,) = records
    assert "RecursionError" in record.parts["rescued"], record.parts
    local = record.parts["local_linears"]
    assert (local["colwise"], local["rowwise"], local["kept"]) == (11, 4, []), local
    assert not record.fallbacks and not any(s["reason"].startswith("nothing to rewrite") for s in record.skipped)


def test_linear_activation_fuses_the_sharded_mlps(mesh):
    """``linear-activation`` (opt-in) on tensor-parallel MLPs: the column-parallel linears' weights are local
    shards, not parameters, and the pass takes them as it takes parameters. nanoGPT's ``gelu(fc1(x))`` becomes
    ``kp::linear_act`` and transformers' Llama ``silu(gate(x)) * up(x)`` (under its own TP plan)
    ``kp::gated_linear``, in every block, with training equal to eager."""
    import kp_compiler
    passes = kp_compiler.default_passes() + ["linear-activation"]
    outs, grads, records = _train_both(lambda: _tp_gpt(mesh), lambda: torch.randint(0, 64, (2, 16)),
                                       {"passes": passes})
    _assert_equal(outs, grads)
    fired = [dict(p.by_rule) for r in records for p in r.passes if p.name == "linear-activation" and p.matches]
    assert fired == [{"single": 2}], fired
    (loss0, grads0, _), (loss1, grads1, records) = _train_llama(mesh, None, passes)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name, g in grads0.items():
        assert g is not None and grads1[name] is not None, name
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-5, msg=name)
    fired = [dict(p.by_rule) for r in records for p in r.passes if p.name == "linear-activation" and p.matches]
    assert fired == [{"gated": 2}], fired
    assert not any(r.fallbacks for r in records), [r.fallbacks for r in records]


def test_an_explicit_layout_given_as_one_size_node_is_read_through_its_value():
    """transformers passes ``shape``/``stride`` entry by entry; a whole size tuple computed in the graph (one node
    whose value is a ``torch.Size``) is read through its example value, and anything else is not a size."""
    from kp_compiler.passes.tp_linears import _sizes

    graph = torch.fx.Graph()
    whole, other = graph.placeholder("shape"), graph.placeholder("other")
    whole.meta["example_value"], other.meta["example_value"] = torch.Size([2, 3]), torch.randn(2)
    assert _sizes(whole) == [2, 3] and _sizes(other) == [None] and _sizes(None) is None
    assert _sizes((whole, 4)) == [None, 4]  # an entry that is not a size


def _tp_gpt_checkpointed(mesh):
    """``_tp_gpt`` with each block activation-checkpointed after the plan (torchtitan's order)."""
    from tests.distributed import worker
    model = _tp_gpt(mesh)
    worker._checkpoint_blocks(model)
    return model


def test_linears_inside_checkpointed_blocks_become_local(mesh):
    """Tensor parallelism with each block checkpointed: the chains are inside the checkpoint bodies. They are
    computed locally there, the shards read outside and handed to the bodies (``passes/tp_checkpoints.py``), so
    the graph is one plain part; ``linear-activation`` then fires inside the bodies, and training equals eager."""
    outs, grads, records = _train_both(lambda: _tp_gpt_checkpointed(mesh), lambda: torch.randint(0, 64, (2, 16)),
                                       {"passes": ["noop-elimination", "linear-activation"]})
    _assert_equal(outs, grads)
    (record,) = records
    local = record.parts["local_linears"]
    assert (local["colwise"], local["rowwise"], local["copies"], local["kept"]) == (8, 4, 4, []), local
    assert (record.parts["plain"], record.parts["rewritten"], record.parts["kept"]) == (1, 1, []), record.parts
    assert [(c["rewrites"], c["kept"]) for c in record.checkpoints] == [(1, True), (1, True)], record.checkpoints
    assert sum(p.matches for p in record.passes if p.name == "linear-activation") == 2
    assert not record.fallbacks


def test_sdpa_is_not_put_into_checkpoints_of_a_dtensor_graph(mesh):
    """An SDPA rewrite inside a checkpoint of a tensor-parallel graph is not kept (torch 2.13's AOTAutograd fails
    on a random-seeded op there, at the first step); the linears stay local and training equals eager."""
    outs, grads, records = _train_both(lambda: _tp_gpt_checkpointed(mesh), lambda: torch.randint(0, 64, (2, 16)),
                                       {"passes": ["noop-elimination", "attention-to-sdpa"]})
    _assert_equal(outs, grads)
    (record,) = records
    assert record.parts["local_linears"]["colwise"] == 8
    assert len(record.checkpoints) == 2 and not any(c["kept"] for c in record.checkpoints), record.checkpoints
    assert all("random-seeded" in c["why"] for c in record.checkpoints), record.checkpoints
    assert not record.fallbacks


def test_fp8_converts_the_shards_inside_checkpointed_blocks(mesh):
    """The shards handed to a checkpoint body keep their ``_tp_local`` names, so ``fp8-linear`` converts the 12
    block linears inside the bodies, and the run equals the same FP8 run without checkpoints."""
    fp8 = {"passes": ["noop-elimination"], "fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*"]}}
    x = lambda: torch.randint(0, 64, (2, 16))  # noqa: E731
    outs, grads, records = _train_both(lambda: _tp_gpt_checkpointed(mesh), x, fp8)
    plain_outs, plain_grads, plain_records = _train_both(lambda: _tp_gpt(mesh), x, fp8)
    fired = [sum(p.matches for r in rs for p in r.passes if p.name == "fp8-linear") for rs in (records, plain_records)]
    assert fired == [12, 12], fired
    torch.testing.assert_close(outs[1], plain_outs[1], rtol=1e-5, atol=1e-6)
    for name, g in plain_grads[1].items():
        checkpointed = name.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.").replace(
            "blocks.1.", "blocks.1._checkpoint_wrapped_module.")
        torch.testing.assert_close(grads[1][checkpointed], g, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(outs[1], outs[0], rtol=1e-6, atol=0)  # FP8 changed the numbers
