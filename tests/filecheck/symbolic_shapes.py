# RUN: 00-input.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["noop-elimination"]}
# A dimension marked dynamic stays symbolic in the canonical graph.
import torch


def kp_example():
    x = torch.randn(6, 16)
    torch._dynamo.mark_dynamic(x, 0)
    lin = torch.nn.Linear(16, 4)
    return (lambda x: torch.nn.functional.silu(lin(x))), (x,)

# CHECK: %l_x_ = input() : f32[[[ROWS:s[0-9]+]], 16]
# CHECK: %linear = aten.linear.default(%l_x_, {{.*}}) : f32[[[ROWS]], 4]
# CHECK-NEXT: %silu = aten.silu.default(%linear) : f32[[[ROWS]], 4]
