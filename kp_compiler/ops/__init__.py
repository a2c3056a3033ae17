"""Custom ops the passes emit (``torch.library``): schema, fake and reference implementations, autograd.

Device kernels are registered for these ops by ``lowering``; the reference
implementations here run anywhere (CPU, XLA, and CUDA until a kernel exists).
"""

from . import fp8, fp8_cuda, fp8_scaled, linear_act, linear_cross_entropy, multi_linear, routed_experts, routed_experts_biased, routed_experts_train  # noqa: F401,E501  (registers the kp:: ops)
