"""The fp8 bench group: its cases exist, carry fp8=True, and only kernelpytorch rows get it."""

import torch

from bench.backends import STANDARD
from bench.cases import Scale, load_all


def test_fp8_cases_carry_their_options_into_kernelpytorch_rows_only():
    cases = {n: c for n, c in load_all().items() if c.group == "fp8"}
    assert set(cases) == {"fp8-linear-8192", "fp8-linear-1024", "fp8-linear-decode-16x4096x4096", "fp8-swiglu-mlp",
                          "fp8-swiglu-mlp-fwd-bwd", "fp8-llama2-train"}
    wl = cases["fp8-swiglu-mlp"].build(Scale("cpu", torch.float32, smoke=True))
    assert wl.kp_options == {"fp8": True}
    kp = STANDARD["kernelpytorch-reduce-overhead"].for_case(wl.kp_options)
    assert kp.options == {"mode": "reduce-overhead", "fp8": True} and kp.mode is None
    assert STANDARD["inductor"].for_case(wl.kp_options) is STANDARD["inductor"]
    assert cases["fp8-llama2-train"].train and cases["fp8-swiglu-mlp-fwd-bwd"].train
