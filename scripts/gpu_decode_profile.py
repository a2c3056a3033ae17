"""Where kernelpytorch's extra time per decode call goes (issue 14): host time, kernels per call, top CPU ops,
and cProfile's Python frames per call.

HF Llama (sdpa, d=2048, 8 layers) at T=1, batch 1 and 8, under Inductor and kernelpytorch in one process.
"""

import cProfile
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.timing import host_per_call
from kp_compiler.core.report import collect
from kp_compiler.testing import hf


def main(size: str = "decode") -> int:
    model, vocab = hf.build("llama", size, attn="sdpa")
    model = model.cuda().to(torch.bfloat16)
    for backend in ("inductor", "kernelpytorch"):
        torch._dynamo.reset()
        f = torch.compile(model, backend=backend)
        for b in (1, 8):
            ids = torch.randint(0, vocab, (b, 1), device="cuda")
            with torch.no_grad(), collect() as records:
                f(ids)
                f(ids)
                host, wall = host_per_call(lambda: f(ids), 30)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        f(ids)
                    torch.cuda.synchronize()
            kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 5
            print(f"== {backend} bs={b}: host {host:.3f} ms/call, wall {wall:.3f} ms/call, "
                  f"{kernels:.0f} GPU kernels/call, graphs compiled now {len(records)}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
            with torch.no_grad():  # the Python side of one call: which frames one path has that the other lacks
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(100):
                    f(ids)
                pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
