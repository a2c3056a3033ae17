"""The passes inside activation-checkpointed regions (``core/checkpoint_bodies.py``): what fires in there, that
training equals eager (losses and every gradient, fresh random inputs), and the rewrites a recomputed body
must not keep."""

import functools

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from kp_compiler.core import checkpoint_bodies
from kp_compiler.core.report import collect
from kp_compiler.testing.models import TinyGPT
from tests.core.test_regions import RoundSTE  # rounds forward, passes the gradient straight through

PASSES = ["noop-elimination", "attention-to-sdpa"]


def checkpointed(model: TinyGPT, context_fn=None, ste: bool = False) -> TinyGPT:
    """Each block's forward under ``checkpoint(..., use_reentrant=False)`` (what transformers'
    ``gradient_checkpointing_enable()`` calls); ``ste``: its output through ``RoundSTE`` inside the region."""
    for block in model.blocks:
        def forward(x, f=block.forward):
            y = f(x)
            return RoundSTE.apply(y) if ste else y
        kwargs = {"context_fn": context_fn} if context_fn is not None else {}
        block.forward = functools.partial(cp.checkpoint, forward, use_reentrant=False, **kwargs)
    return model


def pair(**kwargs) -> tuple:
    torch.manual_seed(0)
    model = checkpointed(TinyGPT(vocab=64, d=64, heads=4, layers=2, max_len=16), **kwargs)
    ref = checkpointed(TinyGPT(vocab=64, d=64, heads=4, layers=2, max_len=16), **kwargs)
    ref.load_state_dict(model.state_dict())
    return model, ref


def train_both(model, ref, options, lengths=(16,), dynamic=None, seed=1):
    """Losses of compiled and eager, their gradients after all steps, and the compiled run's records."""
    compiled = torch.compile(model, backend="kernelpytorch", options=options, dynamic=dynamic)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with collect() as records:
        for length in lengths:
            idx = torch.randint(0, 64, (2, length), generator=gen)
            a, b = compiled(idx).square().mean(), ref(idx).square().mean()
            a.backward()
            b.backward()
            losses.append((a.detach(), b.detach()))
    assert records and not [f for r in records for f in r.fallbacks]
    return losses, records


def assert_same_training(model, ref, losses, rtol=1e-5, atol=1e-6):
    for a, b in losses:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


def fired(records, name: str) -> int:
    return sum(p.matches for r in records for p in r.passes if p.name == name)


@pytest.mark.parametrize("lowering", ["inductor", "eager"])
def test_attention_inside_checkpointed_blocks_becomes_sdpa(lowering):
    model, ref = pair()
    losses, records = train_both(model, ref, {"passes": PASSES, "lowering": lowering})
    assert {r.lowering for r in records} == {lowering}
    assert fired(records, "attention-to-sdpa") == 2
    bodies = [c for r in records for c in r.checkpoints]
    assert [(c["rewrites"], c["kept"]) for c in bodies] == [(1, True), (1, True)], bodies
    assert not [f for r in records for f in r.fallbacks]
    assert_same_training(model, ref, losses)


def test_dynamic_sizes_inside_checkpointed_blocks_add_no_guard():
    """``dynamic=True`` over three lengths: as many graphs as Dynamo makes for the model anyway (the first
    length is specialized by the model's position table), every body rewritten, and no pass adds a guard (the
    lowering's own guards aside)."""
    model, ref = pair()
    lengths = (16, 12, 9)
    losses, records = train_both(model, ref, {"passes": PASSES}, lengths=lengths, dynamic=True)
    graphs = []
    counted = torch.compile(pair()[1], backend=lambda gm, inputs: graphs.append(gm) or gm.forward, dynamic=True)
    for length in lengths:
        counted(torch.randint(0, 64, (2, length)))
    assert len(records) == len(graphs) and fired(records, "attention-to-sdpa") == 2 * len(graphs)
    assert all(c["kept"] for r in records for c in r.checkpoints)
    assert [g for r in records for g in r.guards_added if not g["step"].startswith("lowering")] == []
    assert_same_training(model, ref, losses)


def test_a_custom_autograd_function_inside_a_checkpoint_keeps_its_backward():
    model, ref = pair(ste=True)
    losses, records = train_both(model, ref, {"passes": PASSES})
    assert fired(records, "attention-to-sdpa") == 2
    assert_same_training(model, ref, losses)


def test_selective_checkpointing_policy():
    """``context_fn`` (selective activation checkpointing, torchtitan's "op" mode): matmuls saved, the rest
    recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    model, ref = pair(context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    losses, records = train_both(model, ref, {"passes": PASSES})
    assert fired(records, "attention-to-sdpa") == 2
    assert_same_training(model, ref, losses)


FP8 = {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*"]}


def test_fp8_linears_inside_checkpoints_train_as_without_checkpoints():
    """Tensorwise FP8 (the exact emulation) converts the block linears inside the regions: the run equals the
    same FP8 run without checkpointing, and is not the fp32 one."""
    model, ref = pair()
    torch.manual_seed(0)
    plain = TinyGPT(vocab=64, d=64, heads=4, layers=2, max_len=16)
    plain.load_state_dict(model.state_dict())
    options = {"passes": PASSES, "fp8": FP8}
    losses, records = train_both(model, ref, options)
    plain_losses, plain_records = train_both(plain, checkpointed(TinyGPT(vocab=64, d=64, heads=4, layers=2,
                                                                         max_len=16)), options)
    assert fired(records, "fp8-linear") == fired(plain_records, "fp8-linear") == 8  # qkv, proj, fc1, fc2 x 2
    assert all(c["kept"] for r in records for c in r.checkpoints)
    torch.testing.assert_close(losses[0][0], plain_losses[0][0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(losses[0][0], losses[0][1], rtol=1e-6, atol=0)  # FP8 changed the numbers
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_stateful_fp8_inside_a_checkpoint_is_not_kept():
    """Delayed scaling keeps amax histories that its ops update in place: run twice per step (forward and
    recompute), a body would update them twice, so the body stays as captured and says why."""
    model, ref = pair()
    losses, records = train_both(model, ref, {"passes": PASSES, "fp8": {**FP8, "recipe": "delayed"}})
    bodies = [c for r in records for c in r.checkpoints]
    assert len(bodies) == 2 and not any(c["kept"] for c in bodies), bodies
    assert all("attributes" in c["why"] for c in bodies), bodies
    assert fired(records, "fp8-linear") == 0 and fired(records, "attention-to-sdpa") == 0
    assert_same_training(model, ref, losses)


def test_unsafe_names_what_a_recompute_would_repeat():
    def body(x, w):
        return torch.ops.aten.linear.default(x, w)

    before = torch.fx.symbolic_trace(body)
    after = torch.fx.symbolic_trace(lambda x, w: torch.ops.aten.add_.Tensor(x, w))
    assert checkpoint_bodies.unsafe(before, before, [], []) is None
    assert "writes its inputs" in checkpoint_bodies.unsafe(before, after, [], [])
    assert "guards" in checkpoint_bodies.unsafe(before, before, [object()], [])
    assert "hook" in checkpoint_bodies.unsafe(before, before, [], [object()])
    stateful = torch.fx.symbolic_trace(body)
    stateful.register_buffer("amax", torch.zeros(1))
    with stateful.graph.inserting_before(next(iter(stateful.graph.find_nodes(op="output")))):
        stateful.graph.get_attr("amax")
    assert "amax" in checkpoint_bodies.unsafe(before, stateful, [], [])


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_transformers_gradient_checkpointing(family):
    """transformers' own ``gradient_checkpointing_enable()`` (non-reentrant): Llama with eager attention (its
    attention becomes SDPA and its gated MLP one ``kp::gated_linear`` per layer, inside the regions) and
    Mixtral's ``grouped_mm`` experts (``kp::routed_experts_train`` recomputed in the backward)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, attn_implementation="eager",
                                          **common)
        cls, want = transformers.LlamaForCausalLM, {"attention-to-sdpa": 2, "linear-activation": 2}
    else:
        config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4,
                                            num_experts_per_tok=2, attn_implementation="sdpa", **common)
        cls, want = transformers.MixtralForCausalLM, {"moe-dispatch": 2}
    torch.manual_seed(0)
    model, ref = cls(config), cls(config)
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.train()
        m.gradient_checkpointing_enable()
    options = {"passes": [*PASSES, "linear-activation", "moe-dispatch"], "moe_grouped_mm": "rewrite"}
    compiled = torch.compile(model, backend="kernelpytorch", options=options)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with collect() as records:
        a = compiled(input_ids=idx, labels=idx).loss
    b = ref(input_ids=idx, labels=idx).loss
    a.backward()
    b.backward()
    assert {name: fired(records, name) for name in want} == want
    assert all(c["kept"] for r in records for c in r.checkpoints) and [c for r in records for c in r.checkpoints]
    assert not [f for r in records for f in r.fallbacks]
    assert_same_training(model, ref, [(a.detach(), b.detach())])


def test_a_failure_on_a_body_leaves_it_as_captured(monkeypatch):
    """Anything that goes wrong while a body is rewritten leaves that body as captured (correct, and said in the
    report), never the user's step broken."""
    def broken(body, outer):
        raise RuntimeError("boom")

    monkeypatch.setattr(checkpoint_bodies, "_name_after_graph_inputs", broken)
    model, ref = pair()
    losses, records = train_both(model, ref, {"passes": PASSES})
    bodies = [c for r in records for c in r.checkpoints]
    assert len(bodies) == 2 and all(not c["kept"] and "boom" in c["why"] for c in bodies), bodies
    assert fired(records, "attention-to-sdpa") == 0
    assert_same_training(model, ref, losses)


def test_constant_tensors_a_rewrite_adds_to_a_body_are_passed_in():
    """A rewrite that reads a constant made at compile time (flex attention's block masks are such buffers) gets it
    passed into the checkpoint from the graph around it (``checkpoint_bodies.lift``): here a pass that multiplies
    every GELU's output by a registered tensor of ones. Kept, and training equals eager."""
    import kp_compiler

    def ones_after_gelu(gm):
        count = 0
        for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.gelu.default)):
            name = f"kp_test_ones_{count}"
            gm.register_buffer(name, torch.ones(node.meta["val"].shape[-1]))
            with gm.graph.inserting_before(node):
                ones = gm.graph.get_attr(name)
            ones.meta["val"] = node.meta["val"].new_ones(node.meta["val"].shape[-1])
            with gm.graph.inserting_after(node):
                mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, ones))
            node.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
            count += 1
        gm.recompile()
        return count

    kp_compiler.register_pass("test-ones-after-gelu", ones_after_gelu, replace=True)
    try:
        model, ref = pair()
        losses, records = train_both(model, ref, {"passes": ["test-ones-after-gelu"]})
    finally:
        kp_compiler.unregister_pass("test-ones-after-gelu")
    assert [(c["rewrites"], c["kept"]) for c in records[0].checkpoints] == [(1, True), (1, True)], records
    assert fired(records, "test-ones-after-gelu") == 2
    assert_same_training(model, ref, losses)


class MaskOutside(nn.Module):
    """Blocks whose causal mask is built once outside them and handed in, as transformers builds it outside its
    decoder layers; each block checkpointed. ``mask``: ``"bool"`` (masked_fill with it), ``"additive"`` (a float
    mask added to the scores, ``where(keep, 0, finfo.min)``: transformers' eager mask) or ``"additive-tensor"``
    (the same with ``torch.tensor(0.0)``: a constant in the graph, transformers 5.17's spelling). ``positions``:
    the block also reads the positions (an integer input computed outside, which stays computed in the body)."""

    def __init__(self, d=32, heads=4, layers=2, vocab=64, mask="bool", positions=False):
        super().__init__()
        self.heads, self.emb, self.head = heads, nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.mask, self.pos = mask, nn.Embedding(32, d) if positions else None

    def block(self, i, x, mask, pos):
        B, T, d = x.shape
        if self.pos is not None:
            x = x + self.pos(pos)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv[i](x).split(d, -1))
        att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        att = (att.masked_fill(~mask, float("-inf")) if self.mask == "bool" else att + mask).softmax(-1)
        return x + (att @ v).transpose(1, 2).reshape(B, T, d)

    def forward(self, idx):
        x = self.emb(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        mask = pos[None, :] <= pos[:, None]
        if self.mask != "bool":
            zero = torch.tensor(0.0, device=idx.device) if self.mask == "additive-tensor" else 0.0
            mask = torch.where(mask, zero, torch.finfo(x.dtype).min)
        for i in range(len(self.qkv)):
            x = cp.checkpoint(self.block, i, x, mask, pos, use_reentrant=False)
        return self.head(x)


@pytest.mark.parametrize("mask", ["bool", "additive", "additive-tensor"])
def test_a_mask_built_outside_the_checkpoints_is_read_inside(mask):
    """The causal mask is computed again inside each body (``core/checkpoint_masks.py``), where the attention pass
    proves it causal: SDPA with ``is_causal`` in both blocks, the copied mask dead, and training equal to eager.
    Without the copy the pass only sees a mask tensor."""
    torch.manual_seed(0)
    model, ref = MaskOutside(mask=mask), MaskOutside(mask=mask)
    ref.load_state_dict(model.state_dict())
    losses, records = train_both(model, ref, {"passes": PASSES}, lengths=(16, 12))
    rec = [p for r in records for p in r.passes if p.name == "attention-to-sdpa"]
    assert sum(p.by_rule.get("causal", 0) for p in rec) == 2 * len(records), rec
    assert all(c["kept"] and c["masks_inside"] == 1 for r in records for c in r.checkpoints), records
    assert_same_training(model, ref, losses)


def test_only_the_masks_the_passes_remove_are_computed_inside():
    """The blocks also read the positions, an integer input the graph computes (``arange``) that no pass removes:
    copied with the mask, its copy stays computed, so the body is run again with the mask alone
    (``checkpoint_masks.dead``). One input computed inside each body, the attention causal, training equal."""
    torch.manual_seed(0)
    model, ref = MaskOutside(positions=True), MaskOutside(positions=True)
    ref.load_state_dict(model.state_dict())
    losses, records = train_both(model, ref, {"passes": PASSES})
    rec = [p for r in records for p in r.passes if p.name == "attention-to-sdpa"]
    assert sum(p.by_rule.get("causal", 0) for p in rec) == 2, rec
    assert [(c["kept"], c["masks_inside"]) for c in records[0].checkpoints] == [(True, 1), (True, 1)], records
    assert_same_training(model, ref, losses)


def test_transformers_gemma2_softcapped_attention_inside_checkpoints(monkeypatch):
    """Gemma2's eager attention (tanh softcap, an additive float mask built outside the layers, a sliding window on
    alternate layers) under transformers' gradient checkpointing: the mask is computed again inside each layer,
    where ``attention-kernels`` takes the softcapped attention to ``flex_attention``; the mask copy is dead. The
    CPU has no flex backward under Inductor and the kernel table keeps the CPU on eager math, so the table is told
    to pick flex and the graph runs through AOTAutograd without a compiler (what Inductor gets on the GPU)."""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.backends.debugging import aot_eager

    from kp_compiler.lowering import registry
    from kp_compiler.passes.attention import softcap
    from kp_compiler.passes.attention.kernel_table import Choice
    from kp_compiler.testing import hf

    monkeypatch.setattr(softcap, "choose", lambda case, prefer, flex_options="auto": Choice("flex", "test"))
    monkeypatch.setitem(registry.LOWERINGS, "eager", lambda gm, inputs, *args: aot_eager(gm, inputs))
    torch.manual_seed(0)
    model, vocab = hf.build("gemma2", "tiny", attn="eager")
    ref, _ = hf.build("gemma2", "tiny", attn="eager")
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert isinstance(model, transformers.PreTrainedModel)
    compiled = torch.compile(model, backend="kernelpytorch", options={"lowering": "eager"})
    idx = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(3))
    with collect() as records:
        a = compiled(input_ids=idx, labels=idx).loss
    b = ref(input_ids=idx, labels=idx).loss
    a.backward()
    b.backward()
    rec = [p for r in records for p in r.passes if p.name == "attention-kernels"]
    assert sum(p.by_rule.get("flex-softcap", 0) for p in rec) == 2, rec
    bodies = [c for r in records for c in r.checkpoints]
    assert [(c["kept"], c["masks_inside"]) for c in bodies] == [(True, 1), (True, 1)], bodies
    assert not [f for r in records for f in r.fallbacks]
    # fp32; flex's backward sums in another order
    assert_same_training(model, ref, [(a.detach(), b.detach())], rtol=1e-4, atol=1e-5)


def test_a_random_op_is_read_from_outside_never_copied():
    """A mask drawn at random outside a checkpoint (``rand(...) < p``) is not computed again inside a body: a copy
    would draw other numbers. ``cones`` stops at the random op, which the body then reads as an input."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kp_compiler.core import checkpoint_masks

    def draw(x):
        pos = torch.arange(x.shape[0])
        return (torch.rand(x.shape) < 0.5) & (pos[None, :] <= pos[:, None])

    gm = make_fx(draw, tracing_mode="fake")(torch.randn(4, 4))
    (keep,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.bitwise_and.Tensor)
    nodes, leaves = checkpoint_masks._cone(keep)
    assert [n.target for n in leaves] == [torch.ops.aten.rand.default], leaves
    assert torch.ops.aten.le.Tensor in {n.target for n in nodes}, nodes  # the index arithmetic is copied
    assert not [n for n in nodes if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
