"""Lowering through Inductor (CUDA, ROCm, XPU, CPU).

``compile_fx`` runs AOTAutograd itself, so the rewritten pre-dispatch graph
gets its backward derived there. ``mode`` maps to Inductor's own settings for
that mode (``reduce-overhead`` turns on CUDA graphs, ``max-autotune*`` turn on
autotuning), then ``options["inductor_config"]`` is applied on top.

Inductor's and AOTAutograd's on-disk caches key a graph by its code, not by
what its custom ops do: a ``kp::`` op whose schema or autograd formula
changed (a kernelpytorch upgrade) would otherwise be served an artifact
compiled against the old one. ``OpsVersionTag`` puts a hash of the op
sources into both cache keys, as a post-grad pass that changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def ops_version() -> str:
    """A hash of the sources that define the ``kp::`` ops and their device kernels."""
    digest = hashlib.sha256()
    for path in sorted([*(_PACKAGE / "ops").glob("*.py"), *(_PACKAGE / "lowering").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _tag():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OpsVersionTag(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return f"kernelpytorch-ops-{ops_version()}"

    return OpsVersionTag()


def mode_config(mode: str) -> dict:
    if mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def lower(gm, example_inputs, mode: str, inductor_config: dict):
    import torch._inductor.config as inductor_config_module
    from torch._inductor.compile_fx import compile_fx

    patches = mode_config(mode)
    patches.update(inductor_config)
    if "post_grad_custom_post_pass" not in patches and inductor_config_module.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _tag()
    return compile_fx(gm, list(example_inputs), config_patches=patches or None)
