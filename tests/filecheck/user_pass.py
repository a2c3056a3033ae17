# RUN: 02-swap-relu-for-abs-of-relu.txt --check-prefix=CHECK
# OPTIONS: {"passes": ["noop-elimination", "swap-relu-for-abs-of-relu"]}
# A user pass registered by name runs after the built-in one and gets its own dump.
import torch

import kp_compiler

aten = torch.ops.aten


def relu_to_abs_relu(gm):
    n = 0
    for node in list(gm.graph.nodes):
        if node.target is aten.relu.default:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(aten.abs.default, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            n += 1
    gm.recompile()
    return n


kp_compiler.register_pass("swap-relu-for-abs-of-relu", relu_to_abs_relu, replace=True)


def kp_example():
    return (lambda x: x.relu() * 2), (torch.randn(3, 5),)

# CHECK: after swap-relu-for-abs-of-relu | status ok | matches 1
# CHECK: %relu = aten.relu.default(%l_x_) : f32[3, 5]
# CHECK-NEXT: %[[ABS:[a-z_0-9]+]] = aten.abs.default(%relu) : f32[3, 5]
# CHECK-NEXT: %mul = aten.mul.Tensor(%[[ABS]], 2) : f32[3, 5]
