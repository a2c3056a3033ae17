"""The benchmark harness: statistics, reports, and a CPU smoke run of every group."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import report
from bench.cases import load_all
from bench.timing import median_ci

ROOT = Path(__file__).resolve().parents[2]
SMOKE_CASES = ["attention-causal", "attention-documents-fwd-bwd", "moe-e8-top2-fwd-bwd",
               "linear-gelu", "linear-1024x1024x1024", "gpt-train", "hf-llama-infer"]


def test_median_and_ci():
    t = median_ci([5.0, 1.0, 3.0, 2.0, 4.0] * 4)
    assert t.median_ms == 3.0
    assert t.ci_low_ms <= 3.0 <= t.ci_high_ms
    assert (t.ci_low_ms, t.ci_high_ms) != (1.0, 5.0), "the interval should tighten with 20 samples"


def test_every_group_has_cases():
    groups = {c.group for c in load_all().values()}
    assert groups == {"attention", "moe", "linear", "fp8-sized", "fp8", "e2e", "models", "loss"}
    names = set(load_all())
    for must in ("attention-alibi", "attention-gqa-causal-fwd-bwd", "moe-e64-top8-decode",
                 "hf-mistral-train", "hf-bert-infer", "hf-gpt2-train", "moe-loop-gpt-train",
                 "model-llama3-infer", "model-qwen3-moe-train", "model-gemma2-train", "model-mistral-window-infer",
                 "lce-128k-train", "lce-128k-large-train", "model-llama3-ac-train", "model-gemma2-4096-eager-ac-train"):
        assert must in names


def test_smoke_run_writes_json_markdown_png_and_compares(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--smoke", "--cases", *SMOKE_CASES, "--reps", "3",
           "--out", str(tmp_path), "--stem", "run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run.json").read_text())
    assert results["meta"]["torch"] and "git_commit" in results["meta"]
    assert sorted(c["case"] for c in results["cases"]) == sorted(SMOKE_CASES)
    for c in results["cases"]:
        assert [r["backend"] for r in c["rows"]] == ["eager", "inductor", "inductor-max-autotune", "kernelpytorch"]
        for r in c["rows"]:
            assert "failed" not in r, r
            assert r["median_ms"] > 0 and r["ci95_ms"][0] <= r["median_ms"] <= r["ci95_ms"][1]
            assert r["error"] < 1e-4, (c["case"], r)  # fp32 against an fp64 reference
            assert r["speedup_vs_inductor"] > 0
    first = next(c for c in results["cases"] if c["case"] == "attention-causal")
    assert first["rows"][1]["speedup_vs_inductor"] == 1.0
    assert first["rows"][3]["passes"] == {"attention-to-sdpa": 1}  # kernelpytorch rows say what fired
    assert "passes" not in first["rows"][1]
    assert first["rows"][0]["tflops"] > 0
    md = (tmp_path / "run.md").read_text()
    assert md.count("| attention-causal |") == 4
    assert "- attention-causal / kernelpytorch: attention-to-sdpa x1" in md
    assert (tmp_path / "run.png").stat().st_size > 1000

    # --compare: the run against a baseline where kernelpytorch was a million times faster is flagged.
    baseline = json.loads(json.dumps(results))
    for c in baseline["cases"]:
        for r in c["rows"]:
            if r["backend"] == "kernelpytorch":
                r["speedup_ci95"] = [1e6, 2e6]
    flags = report.compare(results, baseline)
    assert len(flags) == len(SMOKE_CASES) and all("kernelpytorch" in f and "slower" in f for f in flags)
    assert report.compare(results, results) == [], "a run always lies inside its own interval"


def test_failed_backend_is_reported_not_fatal(tmp_path):
    from bench.backends import Backend
    from bench.cases import Scale
    from bench.runner import run_case

    bad = Backend("kernelpytorch[bogus]", "kernelpytorch", options={"no_such_option": 1})
    case = load_all()["attention-plain"]
    result = run_case(case, [Backend("eager"), bad], Scale("cpu", __import__("torch").float32, True), reps=2)
    assert "median_ms" in result["rows"][0]
    assert "no_such_option" in result["rows"][1]["failed"]


def test_rows_are_timed_in_interleaved_rounds_with_samples_pooled():
    """Every backend is compiled before any is timed; round r runs them in reversed order when r is odd,
    and a row's median comes from all its rounds' samples."""
    from bench.backends import Backend
    from bench.cases import Scale
    from bench.runner import run_case

    calls = []

    class Tagged(Backend):
        def wrap(self, model):
            def run(*args):
                calls.append(self.name)
                return model(*args)
            return run

    case = load_all()["attention-plain"]
    result = run_case(case, [Tagged("a"), Tagged("b")], Scale("cpu", __import__("torch").float32, True),
                      reps=10, rounds=3)
    # first calls (a, b), then per round: 3 warm-up + 5 timed calls each, in a b / b a / a b order
    assert calls[:2] == ["a", "b"]
    blocks = [calls[i] for i in range(2, len(calls), 8)]
    assert all(set(calls[i:i + 8]) == {calls[i]} for i in range(2, len(calls), 8))
    assert blocks[-6:] == ["a", "b", "b", "a", "a", "b"]
    assert [r["reps"] for r in result["rows"]] == [15, 15]
    assert all(r["rounds"] == 3 for r in result["rows"])


def test_a_dynamic_length_case_runs_every_length_per_step_and_counts_compiles():
    """One step calls the model once per input tuple; the first step's compiles are counted per compiled row,
    and the error covers every length's output."""
    import torch

    from bench.backends import STANDARD, Backend
    from bench.cases import Scale
    from bench.runner import run_case

    shapes = []

    class Seen(Backend):
        def wrap(self, model):
            def run(q, k, v):
                shapes.append(q.shape[-2])
                return model(q, k, v)
            return run

    case = load_all()["attention-causal-dynamic"]
    result = run_case(case, [Seen("seen"), STANDARD["kernelpytorch"]], Scale("cpu", torch.float32, True), reps=2)
    assert shapes[:3] == [64, 48, 32]  # the first (captured) step: every length, in order
    seen, kp = result["rows"]
    assert "compiles" not in seen  # an uncompiled row has nothing to count
    assert kp["compiles"] == 1, kp  # every dim dynamic: one graph serves the three lengths
    assert kp["error"] < 1e-6 and seen["error"] < 1e-6


def test_a_row_past_its_time_limit_is_recorded_and_the_run_goes_on():
    import time

    from bench.backends import Backend
    from bench.cases import Scale
    from bench.runner import run_case

    case = load_all()["attention-plain"]

    class Slow(Backend):
        def wrap(self, model):
            def slow(*args):
                time.sleep(5)
                return model(*args)
            return slow

    result = run_case(case, [Slow("slow"), Backend("eager")], Scale("cpu", __import__("torch").float32, True),
                      reps=2, row_timeout=1)
    assert "ran past the 1 s row limit" in result["rows"][0]["failed"]
    assert "median_ms" in result["rows"][1]


def test_decode_sequence_smoke(tmp_path):
    """``python -m bench.decode``: graph counts, first pass, steady time and error per size, side by side."""
    cmd = [sys.executable, "-m", "bench.decode", "--smoke", "--modes", "default", "--out", str(tmp_path),
           "--stem", "dec"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "dec.json").read_text())
    rows = {r["backend"]: r for r in results["rows"]}
    assert set(rows) == {"inductor", "kernelpytorch"} and results["meta"]["transformers"]
    assert rows["kernelpytorch"]["graphs"] == rows["inductor"]["graphs"]
    for r in rows.values():
        assert sorted(map(int, r["steady_ms"])) == [1, 3, 8, 13, 24, 40]
        assert all(e < 1e-4 for e in r["error"].values()) and r["first_pass_in_process_s"] > 0
    assert "| kernelpytorch | default |" in (tmp_path / "dec.md").read_text()


def test_decode_first_pass_in_fresh_processes_cold_then_warm(tmp_path):
    """The first pass is timed in a new process on a given cache folder (cold, then warm on the same folder);
    a child that fails raises with its stderr instead of giving a number (``aot_eager`` keeps it fast)."""
    from bench.decode import first_pass_in_fresh_process

    cold = first_pass_in_fresh_process("aot_eager", "default", str(tmp_path), True, "cpu")
    warm = first_pass_in_fresh_process("aot_eager", "default", str(tmp_path), True, "cpu")
    assert cold["first_pass_s"] > 0 and warm["first_pass_s"] > 0
    assert cold["peak_gib"] == 0.0  # the CPU: no GPU memory to report
    with __import__("pytest").raises(RuntimeError, match="no_such_backend"):
        first_pass_in_fresh_process("no_such_backend", "default", str(tmp_path), True, "cpu")


def test_generate_with_a_static_cache_smoke(tmp_path):
    """``python -m bench.generate --smoke``: transformers compiles its decode step with each row's compile
    config; tokens equal the uncompiled model's, and the buckets row names its graphs' plans."""
    from bench import generate

    rc = generate.main(["--smoke", "--rows", "inductor", "kernelpytorch-buckets", "--out", str(tmp_path),
                        "--stem", "gen"])
    assert rc == 0
    results = json.loads((tmp_path / "gen.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert all(rows["kernelpytorch-buckets"]["same_tokens"].values()) and rows["inductor"]["graphs"] >= 1
    assert sorted(map(int, rows["inductor"]["steady_ms"])) == [1, 3, 8, 13]
    # torch 2.9 cannot canonicalize the static-cache graph (a real tensor constant in it): the backend falls
    # back to Inductor on Dynamo's graph, and no bucket plan is made; newer torch makes one per graph
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10):
        assert "- kernelpytorch-buckets: none (CUDA graphs need CUDA inputs" in (tmp_path / "gen.md").read_text()


def test_generate_counts_the_new_tokens_equal_before_the_first_difference():
    from bench.generate import equal_prefix

    want = torch.tensor([[5, 6, 1, 2, 3, 4], [7, 8, 1, 2, 3, 4]])  # 2 prompt tokens, 4 new
    assert equal_prefix(want.clone(), want, 2) == 4
    got = want.clone()
    got[1, 4] = 9  # the second sequence's third new token
    assert equal_prefix(got, want, 2) == 2
    got[0, 2] = 9
    assert equal_prefix(got, want, 2) == 0
    assert equal_prefix(want[:, :5], want, 2) == 0  # a shorter output is not equal


def test_the_loss_case_smoke_runs_the_pass_and_matches_eager_gradients():
    """``lce-128k-train`` at smoke size: kernelpytorch's row (``linear-cross-entropy`` added by the case) fires
    the pass once, and every gradient of its step is close to the float64 reference's."""
    from bench.backends import STANDARD
    from bench.cases import Scale
    from bench.runner import run_case

    result = run_case(load_all()["lce-128k-train"], [STANDARD["kernelpytorch"]], Scale("cpu", torch.float32, True),
                      reps=2)
    (row,) = result["rows"]
    assert "failed" not in row, row.get("traceback")
    assert row["passes"].get("linear-cross-entropy") == 1 and not row["missing_grads"]
    assert row["error"] < 1e-4
