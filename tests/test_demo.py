"""The README's main job runs and reports agreement with eager."""

import subprocess
import sys


def test_demo_runs_and_agrees_with_eager():
    proc = subprocess.run([sys.executable, "-m", "kp_compiler.demo", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernelpytorch explain: 1 graph(s), 0 graph break(s)" in proc.stdout
    assert "noop-elimination" in proc.stdout
    assert "attention-to-sdpa" in proc.stdout and "causal  x2" in proc.stdout
    assert proc.stdout.count("runtime guard on input") == 2  # one tril buffer per layer
    assert proc.stdout.rstrip().endswith("OK")
