"""The FP8 GPU scripts' ``--smoke`` modes run on the CPU: kernel check and loss curves."""

import json
import os
import subprocess
import sys

from kp_compiler.ops import fp8_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_fp8_check_smoke_compares_every_recipe():
    proc = run("scripts/gpu_fp8_check.py", "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rowwise = ("rowwise",) if fp8_cuda.cpu_scaled_mm(rowwise=True) else ()  # torch 2.9's CPU _scaled_mm: per-tensor scales only
    for recipe in ("tensorwise", *rowwise, "delayed", "static"):
        assert f"{recipe:10s} grad_w kernel vs emulation" in proc.stdout
    if not rowwise:
        assert "rowwise    skipped: this torch's CPU _scaled_mm" in proc.stdout
    assert "(ok, tol" in proc.stdout


def test_fp8_loss_curve_smoke_writes_both_curves(tmp_path):
    proc = run("scripts/fp8_loss_curve.py", "--smoke", "--steps", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.load(open(tmp_path / "loss.json"))
    assert len(data["baseline"]) == len(data["fp8_loss"]) == 3
    assert data["baseline"] != data["fp8_loss"]  # the FP8 run really ran in FP8
    assert "head.weight: converted" in "\n".join(data["converted"])
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "final loss" in proc.stdout and "linears converted (9)" in proc.stdout
