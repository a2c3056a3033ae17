"""``linear-cross-entropy``: LM head + cross-entropy onto ``kp::linear_cross_entropy`` in training graphs;
loss and every gradient equal to eager; near misses left alone with the failed link in the report."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kp_compiler.core.report import collect
from kp_compiler.passes.loss import linear_cross_entropy as lce_pass
from kp_compiler.testing.compare import assert_same_grads, grads_of
from kp_compiler.testing.hf import build
from tests.utils import filecheck

PASSES = ["noop-elimination", "linear-cross-entropy"]
OPTS = {"passes": PASSES, "linear_cross_entropy": True}  # on any device (the default: CUDA 9.0 and up)
D, V = 16, 50


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks at test sizes (the op's own default is thousands of rows)."""
    monkeypatch.setattr(lce_pass.lce, "chunk_rows", lambda vocab: 4)


class Head(nn.Module):
    """A body linear, the LM head, then the loss as the test's ``spelling`` writes it."""

    def __init__(self, spelling="float-view", bias=False, softcap=0.0, **ce):
        super().__init__()
        self.spelling, self.softcap, self.ce = spelling, softcap, ce
        self.body = nn.Linear(D, D)
        self.lm = nn.Linear(D, V, bias=bias)

    def forward(self, x, labels):
        logits = self.lm(self.body(x))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.spelling == "float-view":
            flat = logits.float().view(-1, V)
        elif self.spelling == "view-float":
            flat = logits.view(-1, V).float()
        else:  # "reshape": an fp32 model, no cast
            flat = logits.reshape(-1, V)
        return F.cross_entropy(flat, labels.view(-1), **self.ce)


def _labels(shape, ignored=(1, 6), ignore_index=-100):
    y = torch.randint(0, V, shape)
    y.view(-1)[list(ignored)] = ignore_index
    return y


def _check(model, x, y, rtol=1e-5, atol=1e-6, expect=1, **options):
    """Compile with the pass, one training step each way on the same inputs; returns the pass record."""
    compiled = torch.compile(model, backend="kernelpytorch", options={**OPTS, **options})
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    model.zero_grad(set_to_none=True)
    with collect() as records:
        got = compiled(xs[0], y)
    got.backward()
    got_grads = {**grads_of(model.named_parameters()), "x": xs[0].grad}
    model.zero_grad(set_to_none=True)
    ref = model(xs[1], y)
    ref.backward()
    ref_grads = {**grads_of(model.named_parameters()), "x": xs[1].grad}
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
    assert_same_grads(got_grads, ref_grads, rtol=rtol, atol=atol)
    (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
    assert rec.matches == expect, rec.notes
    return rec


@pytest.mark.parametrize("spelling", ["float-view", "view-float"])
@pytest.mark.parametrize("ce", [{}, {"reduction": "sum"}, {"label_smoothing": 0.1}, {"ignore_index": 3}],
                         ids=["mean", "sum", "smoothing", "ignore-3"])
def test_spellings_equal_eager(small_chunks, spelling, ce):
    torch.manual_seed(0)
    _check(Head(spelling, **ce), torch.randn(2, 7, D), _labels((2, 7), ignore_index=ce.get("ignore_index", -100)))


def test_fp32_model_without_cast_and_head_bias(small_chunks):
    torch.manual_seed(0)
    _check(Head("reshape", bias=True), torch.randn(3, 5, D), _labels((3, 5)))


def test_softcap_as_gemma_writes_it(small_chunks):
    torch.manual_seed(0)
    _check(Head(softcap=2.0), torch.randn(2, 7, D) * 4, _labels((2, 7)))


class TiedLM(nn.Module):
    """nanoGPT's tying: the token embedding and the LM head are one parameter, so its gradient is the head's
    (from the op) plus the embedding's (from autograd)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.lm = nn.Linear(D, V, bias=False)
        self.wte.weight = self.lm.weight

    def forward(self, ids, labels):
        logits = self.lm(torch.tanh(self.body(self.wte(ids))))
        return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-1)


def test_tied_embedding_and_head(small_chunks):
    torch.manual_seed(0)
    model = TiedLM()
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    ids, y = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 7))
    y[0, 2] = -1
    with collect() as records:
        got = compiled(ids, y)
    got.backward()
    got_grads = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    ref = model(ids, y)
    ref.backward()
    torch.testing.assert_close(got, ref)
    assert_same_grads(got_grads, grads_of(model.named_parameters()), rtol=1e-5, atol=1e-6)
    assert sum(p.matches for r in records for p in r.passes if p.name == "linear-cross-entropy") == 1


def test_a_frozen_head_gets_no_weight_gradient_gemm(small_chunks, monkeypatch):
    """LoRA fine-tuning freezes the LM head: the op is emitted with ``weight_grads=False`` (no ``grad_W`` GEMM),
    the trainable parameters' gradients equal eager's. Unfreezing: where Dynamo guards requires_grad (torch 2.13)
    it recompiles and the weight's gradient is made again; where it does not (torch 2.9, whose Inductor then
    drops the gradient silently) the graph's hook raises instead."""
    from kp_compiler.ops import linear_cross_entropy as ops
    flags = []
    real = ops.forward
    monkeypatch.setattr(ops, "forward", lambda *a, **k: (flags.append(k.get("weight_grads", True)), real(*a, **k))[1])
    torch.manual_seed(0)
    model = Head(bias=True)
    model.lm.requires_grad_(False)
    rec = _check(model, torch.randn(2, 7, D), _labels((2, 7)))
    assert flags == [False] and rec.matches == 1
    assert model.lm.weight.grad is None
    model.lm.requires_grad_(True)
    try:
        _check(model, torch.randn(2, 7, D), _labels((2, 7)))
    except RuntimeError as e:  # no recompile: never a lost gradient
        assert "was frozen (requires_grad=False) when this graph was compiled" in str(e) and len(flags) == 1
    else:
        assert flags[-1] is True and len(flags) == 2  # recompiled, with the weight's gradient
    hook = lce_pass.FrozenHead((1,), ("weight",))
    hook((torch.zeros(1), torch.zeros(1)))  # still frozen: nothing to say
    with pytest.raises(RuntimeError, match="LM head's weight was frozen"):
        hook((torch.zeros(1), torch.zeros(1, requires_grad=True)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored(small_chunks, reduction):
    """Eager: NaN loss for mean (0 / 0), 0 for sum; zero gradients either way."""
    torch.manual_seed(0)
    _check(Head(reduction=reduction), torch.randn(2, 5, D), torch.full((2, 5), -100))


def test_bf16_model_within_bf16_tolerance(small_chunks):
    torch.manual_seed(0)
    model = Head().bfloat16()
    _check(model, torch.randn(2, 7, D).bfloat16(), _labels((2, 7)), rtol=2e-2, atol=2e-2)


def test_dump(small_chunks, tmp_path):
    torch.manual_seed(0)
    _check(Head(), torch.randn(2, 5, D), _labels((2, 5)), dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "02-linear-cross-entropy.txt").read_text()
    filecheck(
        "CHECK: after linear-cross-entropy | status ok | matches 1\n"
        "CHECK-NOT: cross_entropy_loss\n"
        "CHECK: %reshape_default = aten.reshape.default(%linear, [-1, 16]) : f32[10, 16]\n"
        "CHECK: kp.linear_cross_entropy.default(%reshape_default, %l_self_modules_lm_parameters_weight_, None, "
        "%view_1, -100, 0.0, 'mean', 0.0, 4, True)\n"
        "CHECK: _operator.getitem(%linear_cross_entropy_default, 0) : f32[]\n"
        "CHECK-NOT: aten.linear.default(%linear\n",
        text,
    )


@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2: its final_logit_softcapping (30.0)
def test_transformers_causal_lm_loss_through_a_loss_only_step(small_chunks, name):
    """transformers' own loss (``ForCausalLMLoss``: labels padded and shifted, logits upcast) in a compiled step
    that returns only the loss: rewritten, loss and every gradient equal to eager."""
    model, vocab = build(name, "tiny", attn="sdpa" if name == "llama" else None)
    model.train()
    ids = torch.randint(0, vocab, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    step = torch.compile(lambda ids, labels: model(input_ids=ids, labels=labels).loss, backend="kernelpytorch",
                         options=OPTS)
    with collect() as records:
        _step_equals_eager(step, model, ids, labels)
    assert sum(p.matches for r in records for p in r.passes if p.name == "linear-cross-entropy") == 1


def _step_equals_eager(step, model, ids, labels):
    """One compiled loss-only step and one eager step of transformers' model: loss and every gradient equal."""
    got = step(ids, labels)
    got.backward()
    got_grads = grads_of(model.named_parameters())
    model.zero_grad(set_to_none=True)
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert_same_grads(got_grads, grads_of(model.named_parameters()), rtol=1e-4, atol=1e-5)


def test_transformers_model_returning_logits_is_left_alone_with_advice():
    model, vocab = build("llama", "tiny", attn="sdpa")
    model.train()
    ids = torch.randint(0, vocab, (2, 9))
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    with collect() as records:
        out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
    assert rec.matches == 0 and "returning only the loss" in rec.notes[0], rec.notes


def test_transformers_loss_only_step_with_dynamic_shapes(small_chunks):
    """``dynamic=True`` on transformers' Llama: two sequence lengths, one compile, loss and gradients as eager."""
    model, vocab = build("llama", "tiny", attn="sdpa")
    model.train()
    step = torch.compile(lambda ids, labels: model(input_ids=ids, labels=labels).loss, backend="kernelpytorch",
                         options=OPTS, dynamic=True)
    with collect() as records:
        for t in (9, 13):
            ids = torch.randint(0, vocab, (2, t))
            model.zero_grad(set_to_none=True)
            _step_equals_eager(step, model, ids, ids)
    assert len(records) == 1
    assert sum(p.matches for r in records for p in r.passes if p.name == "linear-cross-entropy") == 1


class ShiftedLogits(Head):
    """The older causal-LM shift (transformers before 4.46, much user code): slice the logits, then the labels."""

    def forward(self, x, labels):
        logits = self.lm(self.body(x))
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, V).float(), shift_labels.view(-1), ignore_index=-1)


def test_older_shift_spelling_slices_the_head_input(small_chunks, tmp_path):
    torch.manual_seed(0)
    _check(ShiftedLogits(), torch.randn(2, 7, D), _labels((2, 7), ignore_index=-1), dump_dir=str(tmp_path))
    text = (tmp_path / "graph-000" / "02-linear-cross-entropy.txt").read_text()
    filecheck("CHECK: aten.slice.Tensor(%linear, 1, 0, -1) : f32[2, 6, 16]\n"
              "CHECK: aten.reshape.default(%slice_tensor, [-1, 16]) : f32[12, 16]\n"
              "CHECK: kp.linear_cross_entropy.default(\n", text)


class VocabSliced(Head):
    def forward(self, x, labels):
        logits = self.lm(self.body(x))[..., :40]
        return F.cross_entropy(logits.reshape(-1, 40).float(), labels.view(-1).clamp(max=39))


class SoftTargets(Head):
    def forward(self, x, labels):
        logits = self.lm(self.body(x)).float().view(-1, V)
        return F.cross_entropy(logits, F.one_hot(labels.view(-1).clamp(min=0), V).float() * 0.9 + 0.1 / V)


class SliceAfterReshape(Head):
    def forward(self, x, labels):
        flat = self.lm(self.body(x)).float().reshape(-1, V)[:-2]  # rows of the flattened logits
        return F.cross_entropy(flat, labels.view(-1)[:-2])


class LogitsToo(Head):
    def forward(self, x, labels):
        logits = self.lm(self.body(x)).float()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1)), logits.argmax(-1)


class ComputedWeight(Head):
    def forward(self, x, labels):
        logits = F.linear(self.body(x), self.lm.weight * 0.5).float()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1))


class Bf16Loss(Head):
    def forward(self, x, labels):
        return F.cross_entropy(self.lm(self.body(x)).view(-1, V), labels.view(-1))


@pytest.mark.parametrize("model, why", [
    (LogitsToo(), "also read by"),
    (ComputedWeight(), "not a parameter"),
    (Head(reduction="none"), "reduction 'none'"),
    (Head(weight=torch.rand(V)), "class weights"),
    (VocabSliced(), "sliced along the vocabulary"),
    (SoftTargets(), "not class indices"),
    (SliceAfterReshape(), "reshaped before a slice"),
], ids=["logits-read-elsewhere", "computed-weight", "reduction-none", "class-weights", "vocab-slice", "soft-targets",
        "slice-after-reshape"])
def test_near_misses_are_left_alone_and_say_why(model, why):
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, D, requires_grad=True), _labels((2, 5))
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    with collect() as records:
        out = compiled(x, y)
    ref = model(x, y)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b)
    (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
    assert rec.matches == 0 and why in " ".join(rec.notes), rec.notes


def test_bf16_loss_without_upcast_is_left_alone():
    torch.manual_seed(0)
    model = Bf16Loss().bfloat16()
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    with collect() as records:
        compiled(torch.randn(2, 5, D, requires_grad=True).bfloat16(), _labels((2, 5)))
    (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
    assert rec.matches == 0 and "not computed in fp32" in rec.notes[0]


def test_inference_graphs_are_not_rewritten():
    torch.manual_seed(0)
    model = Head()
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    with torch.no_grad(), collect() as records:
        compiled(torch.randn(2, 5, D), _labels((2, 5)))
    skipped = [s for r in records for s in r.skipped if s["pass"] == "linear-cross-entropy"]
    assert skipped and "no backward" in skipped[0]["reason"]


def test_left_alone_under_autocast():
    """Mixed-precision training (the model cast to bf16 by ``torch.autocast``, the logits upcast as transformers
    does): the op has no autocast rule and would run the head's GEMMs in fp32, so the pass stays out and says
    why; the loss and gradients are eager's."""
    torch.manual_seed(0)
    model = Head()
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS)
    x, labels = torch.randn(2, 5, D), _labels((2, 5))
    got_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with collect() as records:
            got = compiled(got_x, labels)
        ref = model(ref_x, labels)
    skipped = [s for r in records for s in r.skipped if s["pass"] == "linear-cross-entropy"]
    assert skipped and "torch.autocast is on" in skipped[0]["reason"], [r.skipped for r in records]
    assert not [p for r in records for p in r.passes if p.name == "linear-cross-entropy" and p.matches]
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    got.backward()
    got_grads = {**grads_of(model.named_parameters()), "x": got_x.grad}
    model.zero_grad(set_to_none=True)
    ref.backward()
    assert_same_grads(got_grads, {**grads_of(model.named_parameters()), "x": ref_x.grad}, rtol=1e-2, atol=1e-3)


def test_a_default_pass_gated_by_its_option():
    """In the default list; ``options["linear_cross_entropy"]``: "auto" applies on CUDA 9.0 and up only (where
    it is measured), True on any device, False never; on the CPU by default a training graph with a
    cross-entropy is left alone and the report says how to turn it on."""
    import kp_compiler
    from kp_compiler.core.devices import DeviceInfo
    from kp_compiler.core.target import Target
    from kp_compiler.options import parse_options
    assert "linear-cross-entropy" in kp_compiler.default_passes()
    auto, on, off = (parse_options(None, o) for o in ({}, {"linear_cross_entropy": True},
                                                      {"linear_cross_entropy": False}))
    h200, a100, cpu = DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (8, 0)), DeviceInfo("cpu")
    assert lce_pass.applies(Target(h200, True), auto) is None
    assert "9.0" in lce_pass.applies(Target(a100, True), auto)
    assert "no backward" in lce_pass.applies(Target(h200, False), auto)
    assert "torch.autocast is on" in lce_pass.applies(Target(h200, True, autocast=True), auto)
    assert lce_pass.applies(Target(cpu, True), on) is None
    assert "off" in lce_pass.applies(Target(h200, True), off)
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        parse_options(None, {"linear_cross_entropy": "yes"})
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(2, 5, D, requires_grad=True)
    for options in ({}, {"passes": kp_compiler.default_passes() + ["noop-elimination"]}):
        torch._dynamo.reset()
        with collect() as records:
            torch.compile(model, backend="kernelpytorch", options=options)(x, _labels((2, 5))).backward()
        skipped = [s for r in records for s in r.skipped if s["pass"] == "linear-cross-entropy"]
        assert skipped and "linear_cross_entropy']=True" in skipped[0]["reason"], [r.skipped for r in records]
        assert not [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]


def test_auto_rewrites_only_heads_as_large_as_measured(small_chunks, monkeypatch):
    """Under "auto" on a CUDA 9.0 target (described to the pass; the tensors stay on the CPU) a 50-class head is
    left to Inductor with a note; lowering the threshold below it rewrites the same head."""
    from kp_compiler.core import target as target_mod
    from kp_compiler.core.devices import DeviceInfo
    monkeypatch.setattr(target_mod, "describe", lambda device: DeviceInfo("cuda", (9, 0)))
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(2, 5, D, requires_grad=True)
    for floor, fired in ((lce_pass.AUTO_MIN_VOCAB, 0), (V, 1)):
        monkeypatch.setattr(lce_pass, "AUTO_MIN_VOCAB", floor)
        torch._dynamo.reset()
        with collect() as records:
            torch.compile(model, backend="kernelpytorch", options={"passes": PASSES})(x, _labels((2, 5))).backward()
        (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
        assert rec.matches == fired, rec.notes
        if not fired:
            assert any(f"vocabulary {V} is below the {floor}" in n for n in rec.notes), rec.notes


def test_dynamic_token_count_compiles_once(small_chunks):
    """The token count stays symbolic: the chunk size comes from the vocabulary (a weight's static size)."""
    torch.manual_seed(0)
    model = Head()
    compiled = torch.compile(model, backend="kernelpytorch", options=OPTS, dynamic=True)
    with collect() as records:
        for t in (5, 7, 9):
            x, y = torch.randn(2, t, D, requires_grad=True), _labels((2, t))
            got = compiled(x, y)
            torch.testing.assert_close(got, model(x, y), rtol=1e-5, atol=1e-6)
    assert len(records) == 1  # one compile for the three lengths
    (rec,) = [p for p in records[0].passes if p.name == "linear-cross-entropy"]
    assert rec.matches == 1 and not rec.guards_added  # (Inductor's CPU codegen may add its own; not the pass)


def test_logits_from_another_graph_say_where_they_came_from():
    """A graph break between the head and the loss (or Dynamo's DDP optimizer splitting there): the loss's
    graph gets the logits as an input, and the note says so and how to keep one graph."""
    def loss(logits, labels):
        return F.cross_entropy(logits.float().view(-1, V), labels.view(-1))

    logits = torch.randn(2, 5, V, requires_grad=True)
    compiled = torch.compile(loss, backend="kernelpytorch", options=OPTS)
    with collect() as records:
        compiled(logits, _labels((2, 5))).backward()
    (rec,) = [p for r in records for p in r.passes if p.name == "linear-cross-entropy"]
    assert rec.matches == 0 and "the logits are a graph input" in rec.notes[0] and "optimize_ddp" in rec.notes[0]
