# RUN: 01-linear-activation.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["linear-activation"]}
# A GEGLU with biases (up * gelu_tanh(gate), the product in the other order) becomes one kp.gated_linear with
# both biases; a ReLU MLP's relu(fc(x)) becomes kp.linear_act. Compiled without gradients: the inference ops.
import torch
import torch.nn.functional as F


def kp_example():
    gate, up, fc = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)
    for p in (*gate.parameters(), *up.parameters(), *fc.parameters()):
        p.requires_grad_(False)
    return (lambda x: F.relu(fc(up(x) * F.gelu(gate(x), approximate="tanh")))), (torch.randn(4, 8),)

# CHECK: after linear-activation | status ok | matches 2
# CHECK: %gated_linear_default = kp.gated_linear.default(%l_x_, %l_gate_parameters_weight_, %l_up_parameters_weight_, %l_gate_parameters_bias_, %l_up_parameters_bias_, 'gelu_tanh') : f32[4, 12]
# CHECK-NEXT: %linear_act_default = kp.linear_act.default(%gated_linear_default, %l_fc_parameters_weight_, %l_fc_parameters_bias_, 'relu') : f32[4, 6]
# CHECK-NEXT: return (%linear_act_default)
