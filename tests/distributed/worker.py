"""One rank of the 2-process CPU (gloo) runs in ``test_gloo.py``: a small nanoGPT-style model under DDP or
FSDP2, trained a few steps eagerly and then compiled with ``backend="kernelpytorch"``, from the same seed and
the same per-rank batches. Each rank saves, per run: the losses, the first step's gradients and the final
parameters (full tensors: FSDP2's shards gathered), and the rewrites that fired in the compiled run. The
``-moe`` configs train ``TinyMoEGPT`` (routed experts) instead, replicated by DDP or sharded by FSDP2."""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kp_compiler.core.report import collect
from kp_compiler.testing.models import TinyGPT, TinyMoEGPT

VOCAB, T, STEPS = 64, 16, 4


class Attention(nn.Module):
    """nanoGPT's attention with q, k, v as separate projections and heads taken from the projection's width
    (``view(B, T, -1, hd)``, as transformers writes it): what tensor parallelism splits by heads."""

    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.hd = d // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
        att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, L, -1))


class LossOnly(nn.Module):
    """The model and its shifted next-token loss in one forward that returns only the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return F.cross_entropy(self.model(idx)[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def build_sp() -> nn.Module:
    """``sp_model.Llama`` with biases: torchtitan's module names, for its tensor + sequence parallel plan."""
    from .sp_model import Llama

    torch.manual_seed(0)
    return Llama(vocab=VOCAB, bias=True)


class HFLogits(nn.Module):
    """transformers' ``LlamaForCausalLM`` returning its logits (the worker computes the loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx).logits


def build_hf_tp(mesh) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` (2 layers, sdpa, grouped KV heads) parallelized by transformers' own
    tensor parallelism with the model's own plan, as ``from_pretrained(tp_plan="auto")`` applies it: q, k, v,
    gate, up colwise, o, down rowwise, the embedding rowwise and the LM head colwise with its output gathered."""
    import transformers
    from transformers.integrations.tensor_parallel import apply_tensor_parallelism

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model.tp_plan))
    return HFLogits(model)


def build_hf_ep() -> nn.Module:
    """transformers' ``MixtralForCausalLM`` (2 layers, 4 experts top-2, its ``grouped_mm`` experts) with
    transformers' own expert parallelism over the ranks (the model's ``base_model_ep_plan``, ``ep_size`` = world
    size, ``tp_size`` 1, as ``from_pretrained(distributed_config=DistributedConfig(ep_size=2))`` applies it): each
    rank holds 2 of the 4 experts, and tokens travel to them and back by all-to-all (``ep_implementation=
    "all_to_all"``, what its ``"auto"`` picks in training)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=T, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("ep", "tp"))
    plan = model._expand_parallel_plan({f"model.{k}": v for k, v in config.base_model_ep_plan.items()})
    apply_expert_parallelism(model, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    return HFLogits(model)


def build(moe: bool = False) -> nn.Module:
    """``TinyGPT`` (nanoGPT style: embeddings, pre-LayerNorm blocks, GELU MLP, LM head) with ``Attention``;
    ``moe``: ``TinyMoEGPT``, its MLPs top-2-of-4 routed SwiGLU experts dispatched by a loop."""
    torch.manual_seed(0)
    if moe:
        return TinyMoEGPT(vocab=VOCAB, d=64, heads=4, layers=2, max_len=T, f=64, experts=4, top_k=2)
    m = TinyGPT(vocab=VOCAB, d=128, heads=4, layers=2, max_len=T)
    for block in m.blocks:
        block.attn = Attention(128, 4, T)
    return m


def _wrap(model, config: str):
    if config == "ddp-lce":  # the loss inside the wrapped module (DDP's forward wrapper breaks the graph after it)
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(LossOnly(model))
    # 1 MB buckets (the first bucket's size) over ~1.7 MB of parameters: Dynamo's DDPOptimizer splits the graph
    if config == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, bucket_cap_mb=1)
    if config in ("fsdp2", "fsdp2-gather", "fsdp2-ac"):  # "-gather": the block linears' weights all-gathered in
        from torch.distributed.device_mesh import init_device_mesh  # FP8; "-ac": each block checkpointed

        import kp_compiler
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        if config == "fsdp2-gather":
            kp_compiler.fp8.all_gather_in_fp8(model, include=["blocks.*"])
        if config == "fsdp2-ac":  # torchtitan's order: activation checkpointing, then sharding
            _checkpoint_blocks(model)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if config == "tp-hf":  # transformers' own TP (its styles, its plan): applied in build_hf_tp
        return model
    if config == "tp-sp":  # torchtitan's plan: sequence parallel between the linears
        from torch.distributed.device_mesh import init_device_mesh

        from .sp_model import parallelize
        return parallelize(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    if config in ("tp", "tp-ac"):  # heads and MLP columns split over the ranks (Megatron-style colwise / rowwise
        from torch.distributed.device_mesh import init_device_mesh  # pairs); "-ac": then each block checkpointed
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        plan = {f"attn.{p}": ColwiseParallel() for p in "qkv"}
        plan.update({"attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
        for block in model.blocks:
            parallelize_module(block, mesh, plan)
        if config == "tp-ac":
            _checkpoint_blocks(model)
        return model
    raise ValueError(config)


def _checkpoint_blocks(model) -> None:
    """Each block activation-checkpointed (non-reentrant), as torchtitan's activation checkpointing wraps them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    model.blocks = nn.ModuleList(checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                                 for b in model.blocks)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# the MoE runs: the routed-experts rewrite listed (on the CPU it is not a default: no fused kernel there) and
# forced for training graphs, where moe_grouped_mm="auto" keeps the loop
MOE = {"passes": ["noop-elimination", "attention-to-sdpa", "moe-dispatch"], "moe_grouped_mm": "rewrite"}

# every block linear, in the exact CPU emulation (the LM head excluded: under FSDP2 it runs eagerly, in the
# root's frame that Dynamo skips, so converting it under DDP only would make the runs differ)
FP8 = {"fp8": {"emulate": True, "min_dims": [1, 1, 1], "exclude": ["*head*", "output*"]}}


def _train(config: str, compiled: bool, rank: int) -> dict:
    # the MoE loop's torch.where has a data-dependent size: one graph only with this on; transformers' expert
    # parallelism reads its all-to-all split sizes to the host (``tolist()``): traced as unbacked sizes with this
    moe = config.endswith("-moe")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=moe, capture_scalar_outputs=config == "ep-hf"):
        return _train_in(config, compiled, rank)


def _train_in(config: str, compiled: bool, rank: int) -> dict:
    torch._dynamo.reset()
    fp8, moe = config.endswith("-fp8"), config.endswith("-moe")
    kind = config.removesuffix("-fp8").removesuffix("-moe")
    if kind == "tp-hf":
        from torch.distributed.device_mesh import init_device_mesh
        model = build_hf_tp(init_device_mesh("cpu", (dist.get_world_size(),)))
    elif kind == "ep-hf":
        model = build_hf_ep()
    else:
        model = _wrap(build_sp() if kind == "tp-sp" else build(moe), kind)
    # SGD: the update is linear in the gradient. AdamW turns gradients that are zero up to rounding (the
    # attention's key bias: softmax ignores a per-row constant) into updates of +-lr, so runs that agree to
    # 1e-7 in every gradient would differ by lr in those parameters.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = model
    if compiled and config == "ddp-lce":
        forward = torch.compile(model, backend="kernelpytorch", options={"linear_cross_entropy": True})
    elif compiled:
        # tp-sp, tp-hf: the default passes find nothing to rewrite in these models on the CPU (their attention is
        # SDPA already); listing them runs the pipeline, and the sharded linears are computed locally
        plain = {"passes": ["noop-elimination", "attention-to-sdpa"]} if config in ("tp-sp", "tp-hf") else None
        forward = torch.compile(model, backend="kernelpytorch",
                                options=FP8 if fp8 else MOE if moe or config == "ep-hf" else plain)

    def step(idx):  # the shifted next-token loss ("ddp-lce": the module's own)
        out = forward(idx)
        return out if config == "ddp-lce" else F.cross_entropy(out[:, :-1].reshape(-1, VOCAB),
                                                                idx[:, 1:].reshape(-1))
    # data parallel: each rank its own batches; tensor parallel: one batch for the group, as TP requires (its
    # replicated parameters, such as a row-parallel bias, would drift apart with different batches)
    data = torch.Generator().manual_seed(100 + (0 if config.startswith("tp") else rank))
    out: dict = {"losses": [], "fp8_gathers": [], "amax_reduces": []}
    with collect() as records, _count_fp8_gathers(out["fp8_gathers"], out["amax_reduces"]):
        for i in range(STEPS):
            idx = torch.randint(0, VOCAB, (2, T), generator=data)
            loss = step(idx)
            loss.backward()
            if i == 0:
                out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
            opt.step()
            if kind == "fsdp2-gather":  # the next all-gathers' scales in one all-reduce
                import kp_compiler
                kp_compiler.fp8.precompute_all_gather_scales(model)
            opt.zero_grad()
            out["losses"].append(loss.detach().clone())
    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    out["graphs"] = [{"lowering": r.lowering, "fallbacks": list(r.fallbacks), "skipped": list(r.skipped),
                      "notes": {p.name: [p.status, p.reason, *p.notes] for p in r.passes if p.notes or p.reason},
                      "passes": [{"name": p.name, "matches": p.matches, "by_rule": dict(p.by_rule)}
                                 for p in r.passes if p.matches],
                      "parts": r.parts, "checkpoints": list(r.checkpoints)}
                     for r in records]
    return out


@contextlib.contextmanager
def _count_fp8_gathers(seen: list, reduces: list):
    """Record the dtype of every all-gather input that ``FP8GatherWeight`` hands FSDP2, and the size of every
    all-reduce of amaxes (``ops/fp8_all_gather.py``'s: one scalar per weight, or all at once precomputed)."""
    from kp_compiler.ops import fp8_all_gather
    pre, all_reduce = fp8_all_gather.FP8GatherWeight.fsdp_pre_all_gather, fp8_all_gather.dist.all_reduce

    def spy(self, mesh, outer_size, outer_stride, module, mp_policy):  # FSDP2 reads the signature
        inputs, meta = pre(self, mesh, outer_size, outer_stride, module, mp_policy)
        seen.extend(str(t.dtype) for t in inputs)
        return inputs, meta

    def count(t, *args, **kwargs):
        reduces.append(t.numel())
        return all_reduce(t, *args, **kwargs)
    fp8_all_gather.FP8GatherWeight.fsdp_pre_all_gather = spy
    fp8_all_gather.dist = _Patched(dist, all_reduce=count)
    try:
        yield
    finally:
        fp8_all_gather.FP8GatherWeight.fsdp_pre_all_gather = pre
        fp8_all_gather.dist = dist


class _Patched:
    """``module`` with some attributes replaced (for one module's view of ``torch.distributed`` only)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def main(rank: int, world: int, folder: str, configs: list) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        # "-fp8" runs have no eager twin: the test compares them across wrappings, or with the wrapping's own
        # eager run ("tp-fp8" with "tp")
        results = {c: {**({} if c.endswith("-fp8") else {"eager": _train(c, False, rank)}),
                       "kernelpytorch": _train(c, True, rank)} for c in configs}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
