"""Host time against GPU time (``runtime/host_time.py``): the verdict's two branches, and no timing where there
is no GPU (explain then prints no line)."""

import torch
from torch import nn

from kp_compiler.runtime.host_time import HostGpu, measure, verdict


def test_a_call_whose_launches_outlast_its_gpu_work_is_host_bound():
    line = verdict(HostGpu(host_ms=2.25, gpu_ms=0.62, wall_ms=2.31))
    assert line == ('wall 2.31 ms per call: host 2.25 ms, GPU 0.62 ms -> host-bound; mode="reduce-overhead" '
                    'could bring it near 0.62 ms (up to 3.7x)')


def test_a_call_whose_gpu_work_outlasts_its_launches_is_gpu_bound():
    line = verdict(HostGpu(host_ms=0.30, gpu_ms=5.0, wall_ms=5.1))
    assert line.endswith("-> GPU-bound: CUDA graphs would save little") and "host-bound" not in line


def test_gpu_time_with_launch_gaps_is_not_given():
    line = verdict(HostGpu(host_ms=9.0, gpu_ms=None, wall_ms=9.5))
    assert "GPU time not measured" in line and "host-bound" not in line


def test_without_a_gpu_nothing_is_timed_and_explain_says_nothing(monkeypatch):
    from kp_compiler import explain

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert measure(lambda: None) is None
    report = explain(nn.Linear(4, 4).eval(), torch.randn(2, 4))
    assert report.host_time is None and "the compiled call, timed" not in str(report)
