# RUN: 00-input.txt --check-prefix=INPUT
# RUN: 01-linear-activation.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["linear-activation"]}
# A SwiGLU MLP (Llama's): silu(gate(x)) * up(x) becomes one kp.gated_linear; the down projection stays a
# linear (nothing reads it through an activation). Compiled without gradients: the inference variant.
import torch
import torch.nn.functional as F


def kp_example():
    gate, up, down = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 8)
    for p in (*gate.parameters(), *up.parameters(), *down.parameters()):
        p.requires_grad_(False)
    return (lambda x: down(F.silu(gate(x)) * up(x))), (torch.randn(4, 8),)

# INPUT: %linear = aten.linear.default(%l_x_, %{{.*}}) : f32[4, 12]
# INPUT-NEXT: %silu = aten.silu.default(%linear) : f32[4, 12]
# INPUT-NEXT: %linear_1 = aten.linear.default(%l_x_, %{{.*}}) : f32[4, 12]
# INPUT-NEXT: %mul = aten.mul.Tensor(%silu, %linear_1) : f32[4, 12]

# CHECK: after linear-activation | status ok | matches 1
# CHECK: %gated_linear_default = kp.gated_linear.default(%l_x_, %{{.*}}, %{{.*}}, None, None, 'silu') : f32[4, 12]
# CHECK-NEXT: %linear_2 = aten.linear.default(%gated_linear_default, %{{.*}}, %{{.*}}) : f32[4, 8]
# CHECK-NOT: aten.silu
