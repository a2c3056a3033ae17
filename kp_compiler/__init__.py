"""KernelPyTorch: a torch.compile backend that rewrites graphs onto the best kernels.

Use it without importing anything::

    model = torch.compile(model, backend="kernelpytorch")

Import it to write passes, inspect what it did, or choose options::

    import kp_compiler
    kp_compiler.register_pass("my-pass", my_pass)
    passes = kp_compiler.default_passes() + ["my-pass"]
    model = torch.compile(model, backend="kernelpytorch", options={"passes": passes})
    print(kp_compiler.explain(model_fn, x))
"""

from . import fp8
from .backend import kernelpytorch
from .core.pass_manager import (
    PassError,
    default_passes,
    register_pass,
    registered_passes,
    unregister_pass,
)
from .core.rules import Match, Matches, P, Rule, RuleSet
from .explain import ExplainReport, explain
from .options import Options, parse_options

__version__ = "0.1.0"

__all__ = [
    "ExplainReport", "Match", "Matches", "Options", "P", "PassError", "Rule", "RuleSet",
    "default_passes", "explain", "fp8", "kernelpytorch", "parse_options", "register_pass",
    "registered_passes", "unregister_pass",
]
