# RUN: 01-noop-elimination.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["noop-elimination"]}
# An int tensor times 1.0 is a float tensor: the multiply stays.
import torch


def kp_example():
    return (lambda x: (x * 1.0).relu()), (torch.arange(8).view(2, 4),)

# CHECK: after noop-elimination | status ok | matches 0
# CHECK: %mul = aten.mul.Tensor(%l_x_, 1.0) : f32[2, 4]
# CHECK-NEXT: %relu = aten.relu.default(%mul) : f32[2, 4]
