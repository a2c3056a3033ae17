"""``bench.distributed`` (issue 21) in its CPU smoke form: 2 gloo processes, each wrapping with eager and
kernelpytorch rows; the kernelpytorch losses equal eager's, and the rewrites fire under DDP, FSDP2 and tensor
parallelism (there in the parts of the graph that compute on plain tensors)."""

import pytest
import torch.distributed as dist

from bench import distributed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


def test_smoke_rows_for_every_wrapping(tmp_path, capfd):
    result = distributed.main(["--smoke", "--steps", "2", "--warmup", "1", "--backends", "eager", "kernelpytorch",
                               "--out", str(tmp_path), "--stem", "smoke"])
    printed = capfd.readouterr().out  # each row as it finished (rank 0), before the table
    assert printed.index("row ddp eager: median ") < printed.index("row tp kernelpytorch: ") < printed.index("| config")
    rows = {(r["config"], r["backend"]): r for r in result["summary"]}
    assert set(rows) == {(c, b) for c in distributed.CONFIGS for b in ("eager", "kernelpytorch")}
    assert not [r for r in rows.values() if "failed" in r]
    for config in distributed.CONFIGS:
        kp = rows[config, "kernelpytorch"]
        assert abs(kp["loss_ratio"] - 1) < 1e-4 and kp["median_ms"] > 0 and kp["tokens_per_s"] > 0
    assert rows["ddp", "kernelpytorch"]["fired"].get("attention-to-sdpa", 0) >= 2
    assert rows["fsdp2", "kernelpytorch"]["fired"].get("attention-to-sdpa", 0) >= 1
    assert rows["tp", "kernelpytorch"]["fired"].get("attention-to-sdpa", 0) >= 1  # in the plain parts
    assert not rows["tp", "kernelpytorch"]["fallbacks"]
    assert (tmp_path / "smoke.md").read_text().count("| kernelpytorch |") == 3
    for config in distributed.CONFIGS:  # each rank's own report, the same rewrites on both here
        kp = rows[config, "kernelpytorch"]
        assert len(kp["fired_per_rank"]) == 2 and kp["fired_per_rank"][0] == kp["fired_per_rank"][1] == kp["fired"]


def test_progress_lines():
    line = distributed.progress("fsdp2", "eager", {"median_ms": 12.5, "losses": [4.25, 4.0]})
    assert line == "row fsdp2 eager: median 12.500 ms; losses 4.2500 4.0000"
    failed = distributed.progress("tp", "kernelpytorch", {"failed": "RuntimeError: x"})
    assert failed == "row tp kernelpytorch: failed: RuntimeError: x"


def test_per_rank_reports_name_the_ranks_that_differ():
    show = lambda f: ", ".join(f"{k} x{v}" for k, v in f.items())  # noqa: E731
    assert distributed.per_rank([{"attention-to-sdpa": 2}] * 2, show) == "attention-to-sdpa x2"
    assert distributed.per_rank([{"attention-to-sdpa": 2}, {}], show) == "rank 0: attention-to-sdpa x2; rank 1: none"


def test_transformers_tp_rows_over_changing_lengths(tmp_path):
    """``--configs tp-hf --seqs``: transformers' Llama under its own TP plan, the sequence length cycled so the
    second length recompiles with symbolic sizes; kernelpytorch's losses equal eager's, nothing falls back, and
    tokens/s counts the mean length (one batch for both ranks under TP)."""
    pytest.importorskip("transformers")
    result = distributed.main(["--smoke", "--configs", "tp-hf", "--steps", "4", "--warmup", "1", "--seqs", "16", "8",
                               "--backends", "eager", "kernelpytorch", "--out", str(tmp_path), "--stem", "hf"])
    rows = {r["backend"]: r for r in result["summary"]}
    assert set(rows) == {"eager", "kernelpytorch"} and not [r for r in rows.values() if "failed" in r], rows
    kp = rows["kernelpytorch"]
    assert abs(kp["loss_ratio"] - 1) < 1e-4 and not kp["fallbacks"], kp
    assert result["seqs"] == [16, 8]
    assert abs(kp["tokens_per_s"] - result["shape"]["batch"] * 12 / (kp["median_ms"] / 1e3)) < 1e-6 * kp["tokens_per_s"]


def test_placement_of_ranks():
    """NCCL needs a GPU per rank (else the CPU with gloo); ``--comm gloo`` lets ranks share the GPUs there are."""
    cpu, gpu = distributed.torch.device("cpu"), distributed.torch.device
    assert distributed.placement(1, 2, "nccl", False, 2) == (gpu("cuda", 1), "nccl")
    assert distributed.placement(1, 2, "nccl", False, 1) == (cpu, "gloo")
    assert distributed.placement(1, 2, "gloo", False, 1) == (gpu("cuda", 0), "gloo")
    assert distributed.placement(3, 4, "gloo", False, 2) == (gpu("cuda", 1), "gloo")
    assert distributed.placement(1, 2, "gloo", True, 1) == (cpu, "gloo")
    assert distributed.placement(0, 2, "gloo", False, 0) == (cpu, "gloo")
    with pytest.raises(ValueError, match="unknown comm"):
        distributed.placement(0, 2, "mpi", False, 1)


def test_shared_gpu_rows_are_not_timed_against_inductor():
    """With the ranks on a shared GPU over gloo, the table says its times are no speed comparison and shows no
    ratio to Inductor; the loss columns stay."""
    result = {"world": 2, "device": "cuda", "dtype": "torch.bfloat16", "shape": {}, "comm": "gloo", "gpus": 1}
    row = dict(median_ms=10.0, tokens_per_s=1.0, peak_gib=[1.0, 1.0], loss_ratio=1.0, max_deviation=2e-3,
               final_loss=5.0, fired_per_rank=[{}, {}], fallbacks_per_rank=[[], []])
    rows = [{"config": "tp", "backend": "inductor", **row}, {"config": "tp", "backend": "kernelpytorch", **row}]
    text = distributed.markdown(rows, result)
    assert "not a speed comparison" in text and "1.00x" not in text and "2.00e-03" in text
    assert "1.00x" in distributed.markdown(rows, {**result, "comm": "nccl"})


def test_activation_checkpointed_rows(tmp_path):
    """``--ac``: every block checkpointed; kernelpytorch's losses equal eager's, and under FSDP2 the attention inside
    the checkpointed blocks is still rewritten (``core/checkpoint_bodies.py``)."""
    result = distributed.main(["--smoke", "--ac", "--configs", "fsdp2", "tp", "--steps", "2", "--warmup", "1",
                               "--backends", "eager", "kernelpytorch", "--out", str(tmp_path), "--stem", "ac"])
    rows = {(r["config"], r["backend"]): r for r in result["summary"]}
    assert result["ac"] and not [r for r in rows.values() if "failed" in r], rows
    for config in ("fsdp2", "tp"):
        kp = rows[config, "kernelpytorch"]
        assert abs(kp["loss_ratio"] - 1) < 1e-4 and not kp["fallbacks"], kp
    assert rows["fsdp2", "kernelpytorch"]["fired"].get("attention-to-sdpa", 0) >= 1
    assert "activation-checkpointed" in (tmp_path / "ac.md").read_text()
