# RUN: 00-input.txt --check-prefix=INPUT
# RUN: 01-noop-elimination.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["noop-elimination"]}
# A multiply by one, a same-shape view and a double transpose disappear;
# relu reads the linear directly.
import torch


def kp_example():
    lin = torch.nn.Linear(8, 8)
    return (lambda x: (lin(x) * 1).view(4, 8).t().t().relu()), (torch.randn(4, 8),)

# INPUT: %linear = aten.linear.default(%l_x_, %{{.*}}) : f32[4, 8]
# INPUT-NEXT: %mul = aten.mul.Tensor(%linear, 1) : f32[4, 8]
# INPUT-NEXT: %view = aten.view.default(%mul, [4, 8]) : f32[4, 8]
# INPUT-NEXT: %t = aten.t.default(%view) : f32[8, 4]
# INPUT-NEXT: %t_1 = aten.t.default(%t) : f32[4, 8]
# INPUT-NEXT: %relu = aten.relu.default(%t_1) : f32[4, 8]

# CHECK: after noop-elimination | status ok | matches 3
# CHECK: %linear = aten.linear.default(%l_x_, %{{.*}}) : f32[4, 8]
# CHECK-NEXT: %relu = aten.relu.default(%linear) : f32[4, 8]
# CHECK-NEXT: return (%relu)
