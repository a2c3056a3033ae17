"""``ops/fp8_all_gather.py`` and ``kp_compiler.fp8.all_gather_in_fp8`` without a process group: the wrapper
survives what FSDP2 and optimizers do to a shard, the all-gather extension's round trip gives back weights the
``fp8-linear`` pass re-quantizes to the very FP8 values sent, and bad use is refused. The FSDP2 runs on 2
processes are in ``tests/distributed/test_gloo.py``."""

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kp_compiler
from kp_compiler.core.report import collect
from kp_compiler.ops.fp8_all_gather import FP8GatherWeight, gathered_in_fp8
from kp_compiler.ops import fp8_quant
from kp_compiler.ops.fp8_quant import quantize_dynamic

E4M3 = torch.float8_e4m3fn


class OneRank:
    """The two things ``fsdp_pre_all_gather`` asks of FSDP2's shard mesh, for ``size`` ranks (no collective
    runs at size 1)."""

    ndim = 1

    def __init__(self, size: int = 1):
        self._size = size

    def size(self):
        return self._size

    def get_group(self):
        return "group"


def _gather(shard: torch.Tensor, rows: int, param_dtype=None, ranks: int = 1):
    """One rank's pre- and post-all-gather, the all-gather being this rank's bytes ``ranks`` times."""
    w = FP8GatherWeight(shard, E4M3)
    (sent,), meta = w.fsdp_pre_all_gather(OneRank(ranks), torch.Size([rows, shard.shape[1]]), (shard.shape[1], 1),
                                          None, SimpleNamespace(param_dtype=param_dtype))
    gathered = sent.repeat(ranks, 1)
    weight, inner = w.fsdp_post_all_gather((gathered,), meta, param_dtype or shard.dtype)
    return sent, meta[0], weight, inner


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 300.0])
def test_the_pass_requantizes_the_gathered_weight_to_the_bytes_sent(dtype, spread):
    torch.manual_seed(int(spread * 7) + (dtype == torch.bfloat16))
    shard = (torch.randn(48, 64) * spread).to(dtype)
    sent, scale, weight, inner = _gather(shard, 48)
    assert sent.dtype == torch.uint8 and sent.shape == (48, 64)
    assert weight.dtype == dtype and inner == (weight,)
    q, s = quantize_dynamic(weight, E4M3, rowwise=False)  # what fp8-linear does to the gathered weight
    assert torch.equal(q.view(torch.uint8), sent)
    torch.testing.assert_close(s, scale, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6, atol=0)
    # and the values are the shard's FP8 rounding: what the pass would have computed from the shard itself
    q0, s0 = quantize_dynamic(shard, E4M3, rowwise=False)
    assert torch.equal(q0, q) and torch.equal(s0, scale)
    assert gathered_in_fp8(weight) and not gathered_in_fp8(shard)


def test_mixed_precision_quantizes_the_param_dtype_copy():
    """Under ``MixedPrecisionPolicy(param_dtype=bf16)`` the graph sees bf16 weights: the scale is taken from the
    bf16 copy, so the FP8 values are those the pass computes without the wrapper."""
    torch.manual_seed(3)
    shard = torch.randn(32, 32)
    sent, scale, weight, _ = _gather(shard, 32, param_dtype=torch.bfloat16)
    q0, s0 = quantize_dynamic(shard.bfloat16(), E4M3, rowwise=False)
    assert weight.dtype == torch.bfloat16 and torch.equal(q0.view(torch.uint8), sent) and torch.equal(s0, scale)


def test_the_amax_is_all_reduced_over_the_shard_group(monkeypatch):
    """Every rank quantizes with one scale: the shard's amax goes through one all-reduce (MAX) over FSDP2's shard
    group (recorded here, no process group), and the scale comes from the reduced value."""
    reduced = []

    def all_reduce(t, op, group):
        reduced.append((t.clone(), op, group))
        t.mul_(4)  # another rank held a larger value
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    torch.manual_seed(4)
    shard = torch.randn(16, 16)
    w = FP8GatherWeight(shard, E4M3)
    (sent,), (scale,) = w.fsdp_pre_all_gather(OneRank(4), torch.Size([64, 16]), (16, 1), nn.Linear(16, 64),
                                              SimpleNamespace(param_dtype=None))
    assert len(reduced) == 1 and reduced[0][1] == torch.distributed.ReduceOp.MAX and reduced[0][2] == "group"
    torch.testing.assert_close(reduced[0][0], shard.abs().amax())
    assert sent.shape == (16, 16) and torch.equal(scale, fp8_quant.scale_from_amax(shard.abs().amax() * 4, E4M3))


def test_layouts_it_does_not_handle_are_refused_at_the_first_all_gather():
    """Rows that do not split evenly over the shard group (FSDP2 would pad them and re-pad at its lazy init,
    behind a state_dict taken before) and a weight that tensor parallelism also shards: a clear error."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    w = FP8GatherWeight(torch.randn(13, 16), E4M3)
    with pytest.raises(NotImplementedError, match="does not split evenly"):
        w.fsdp_pre_all_gather(OneRank(4), torch.Size([50, 16]), (16, 1), nn.Linear(16, 50),
                              SimpleNamespace(param_dtype=None))
    tp_weight = SimpleNamespace(weight=_FakeDTensor((Shard(0), Shard(1))))
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        w.fsdp_pre_all_gather(OneRank(1), torch.Size([13, 16]), (16, 1), tp_weight, SimpleNamespace(param_dtype=None))
    # HSDP (replicated over one mesh dimension, sharded over the other) is FSDP2's own layout: not refused
    hsdp = SimpleNamespace(weight=_FakeDTensor((Replicate(), Shard(0))))
    w.fsdp_pre_all_gather(OneRank(1), torch.Size([13, 16]), (16, 1), hsdp, SimpleNamespace(param_dtype=None))


class _FakeDTensor:
    """Only what ``_check_layout`` reads of a module's weight: a DTensor's placements."""

    def __init__(self, placements):
        self.placements = placements


def test_the_backwards_regather_writes_in_place_without_bumping_the_version():
    """FSDP2 re-gathers into the storage it freed with ``out=`` the unsharded parameter, which autograd saved in
    the forward: a version bump would fail the backward."""
    torch.manual_seed(5)
    shard = torch.randn(32, 16)
    w = FP8GatherWeight(shard, E4M3)
    sent, scale, weight, _ = _gather(shard, 32)
    out = nn.Parameter(torch.zeros_like(weight))
    version = out._version
    assert w.fsdp_post_all_gather((sent,), (scale,), torch.float32, out=out) is None
    assert torch.equal(out.detach(), weight) and out._version == version and gathered_in_fp8(out)


def test_the_wrapper_survives_sharding_optimizers_and_state_dicts():
    torch.manual_seed(6)
    lin = nn.Linear(32, 16)
    assert kp_compiler.fp8.all_gather_in_fp8(lin) == [""]
    w = lin.weight
    assert type(w.data) is FP8GatherWeight
    # what FSDP2 does to a parameter when it shards it, and DTensor when it wraps the shard
    for t in (w.detach(), *w.data.chunk(2), w.data.new_zeros(8, 32), w.data.narrow(0, 0, 4), w.data.view(-1)):
        assert type(t) is FP8GatherWeight, t
    assert type(w.data @ torch.ones(32)) is torch.Tensor  # arithmetic is plain
    before = w.detach().clone()
    assert type(before) is torch.Tensor  # a copy is not the parameter (optimizer state, for one)
    y = lin(torch.randn(4, 32))
    y.square().sum().backward()
    assert type(w.grad) is torch.Tensor and w.grad.abs().sum() > 0
    for opt in (torch.optim.SGD([w], lr=0.1), torch.optim.AdamW([w], lr=0.1)):
        opt.step()
    assert type(w.data) is FP8GatherWeight and not torch.equal(w.detach()._data, before)
    assert all(type(v) is torch.Tensor for st in opt.state.values() for v in st.values() if v.dim())  # AdamW's
    # a checkpoint holds the plain weights: it loads without this class (weights_only), into a wrapped model too
    buffer = io.BytesIO()
    torch.save(lin.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert type(state["weight"]) is torch.Tensor and torch.equal(state["weight"], w.detach()._data)
    with torch.no_grad():
        w.zero_()
    assert type(w.data) is FP8GatherWeight and not w.detach()._data.any()
    lin.load_state_dict(state)
    assert type(w.data) is FP8GatherWeight and torch.equal(w.detach()._data, state["weight"])


def test_all_gather_in_fp8_selects_and_refuses():
    model = nn.ModuleDict({"up": nn.Linear(64, 128), "odd": nn.Linear(64, 20), "head": nn.Linear(128, 64)})
    assert kp_compiler.fp8.all_gather_in_fp8(model, exclude=["head"]) == ["up"]  # 20 rows: no scaled GEMM
    assert type(model["head"].weight.data) is torch.Tensor and type(model["odd"].weight.data) is torch.Tensor
    for bad in (torch.bfloat16, torch.float8_e5m2):
        with pytest.raises(ValueError, match="E4M3"):
            kp_compiler.fp8.all_gather_in_fp8(model, dtype=bad)
    with pytest.raises(TypeError, match="before fully_shard"):
        kp_compiler.fp8.all_gather_in_fp8(model)  # "up" is wrapped already
    # over 3 ranks: 128 rows do not split evenly (FSDP2 would pad them), 96 do
    model = nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(64, 96)})
    assert kp_compiler.fp8.all_gather_in_fp8(model, shard_group_size=3) == ["down"]


def test_the_pass_names_a_kept_linear_whose_weight_arrived_in_fp8():
    """A linear ``fp8-linear`` keeps in high precision (here: below ``min_dims``) computes with the FP8-rounded
    weight if that weight was gathered in FP8; the pass's notes say so (and nothing for a plain weight)."""
    torch.manual_seed(7)
    _, _, weight, _ = _gather(torch.randn(32, 32), 32)
    gathered, plain = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
    gathered.weight = nn.Parameter(weight)  # FSDP2 sets the module's weight to the gathered tensor like this
    model = nn.Sequential(gathered, nn.ReLU(), plain)
    options = {"fp8": {"emulate": True, "min_dims": [10 ** 6, 1, 1]}}
    torch._dynamo.reset()
    with collect() as records:
        torch.compile(model, backend="kernelpytorch", options=options)(torch.randn(4, 32))
    notes = [n for r in records for p in r.passes if p.name == "fp8-linear" for n in p.notes]
    flagged = [n for n in notes if "all-gathered in FP8" in n]
    assert len(flagged) == 1 and flagged[0].split(":")[0].endswith("0.weight"), notes


def test_precomputed_scales_take_one_all_reduce_and_are_never_stale(monkeypatch):
    """``precompute_all_gather_scales`` reduces every wrapped weight's amax in one all-reduce; the all-gathers
    then use it (no all-reduce of their own) and quantize as the per-weight path does, also for a bf16
    ``param_dtype`` (rounding is monotonic); once a weight changes in place (an optimizer step), its
    all-gather takes its own all-reduce again."""
    calls = []

    def all_reduce(t, op, group=None):
        calls.append(t.numel())
        t.mul_(2)  # another rank held larger values
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 16))
    assert kp_compiler.fp8.all_gather_in_fp8(model, shard_group_size=4) == ["0", "1", "2"]
    assert kp_compiler.fp8.precompute_all_gather_scales(model) == 3 and calls == [3]

    def gather(lin, param_dtype=None):
        return lin.weight.fsdp_pre_all_gather(OneRank(4), lin.weight.shape, (lin.weight.shape[1], 1), lin,
                                                   SimpleNamespace(param_dtype=param_dtype))
    for param_dtype in (None, torch.bfloat16):
        for lin in model:
            (pre_q,), (pre_s,) = gather(lin, param_dtype)
            w = lin.weight.detach()._data
            w = w if param_dtype is None else w.to(param_dtype)
            expected = fp8_quant.scale_from_amax(w.float().abs().amax() * 2, E4M3)
            assert torch.equal(pre_s, expected), (param_dtype, pre_s, expected)
            assert torch.equal(pre_q, fp8_quant.quantize(w, expected, E4M3).view(torch.uint8))
    assert calls == [3]  # none of their own
    with torch.no_grad():
        model[1].weight.add_(1.0)  # an optimizer step on one weight
    gather(model[0])
    assert calls == [3]
    gather(model[1])
    assert calls == [3, 1]  # the changed weight's scale is taken afresh
