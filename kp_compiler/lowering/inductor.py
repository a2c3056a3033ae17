"""Lowering through Inductor (CUDA, ROCm, XPU, CPU).

``compile_fx`` runs AOTAutograd itself, so the rewritten pre-dispatch graph
gets its backward derived there. ``mode`` maps to Inductor's own settings for
that mode (``reduce-overhead`` turns on CUDA graphs, ``max-autotune*`` turn on
autotuning), then ``options["inductor_config"]`` is applied on top.

With a dump folder, the graphs Inductor lowers (forward and backward, after
its own post-grad passes) go there as ``lowered-forward.txt`` and
``lowered-backward.txt``, and ``lowered-code.txt`` lists the generated
modules; Inductor's FX graph cache is then off, so they are always written.

Inference graphs (grad mode off, or no input requiring grad) are lowered
with Inductor's ``size_asserts`` and ``alignment_asserts`` off (``RUNTIME_ASSERTS``):
those re-check every graph input's sizes, strides and alignment on every call,
which Dynamo's guards already check before the call (a changed stride
recompiles), at about 1 us per input of host time; a graph holding 192
expert weights spent 0.4 ms per call in them (H100 host, torch 2.11,
``bench/results/2026-11-24-h100-moe-overhead.txt``), more than the decode
step's GPU work. vLLM turns them off for serving for the same reason. The
checks they also make on fallback kernels' outputs are lost with them;
training graphs keep both. ``options["inductor_config"]`` (or
``$TORCHINDUCTOR_SIZE_ASSERTS``) still decides where given.

Training graphs with CUDA inputs get Inductor's decomposition table less the ops
whose ATen kernel is kept (``decompositions.py``: the embedding backward, whose
decomposition makes an fp32 ``[V, d]`` buffer).

Inductor's and AOTAutograd's on-disk caches key a graph by its code, not by
what its custom ops do: a ``kp::`` op whose schema or autograd formula
changed (a kernelpytorch upgrade) would otherwise be served an artifact
compiled against the old one. ``OpsVersionTag`` puts a hash of the op
sources into both cache keys, as a post-grad pass that changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from . import decompositions

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def ops_version() -> str:
    """A hash of every module whose code an op or a pass runs (``core``, ``ops``, ``passes``, ``lowering``)."""
    digest = hashlib.sha256()
    for path in sorted(p for part in ("core", "ops", "passes", "lowering") for p in (_PACKAGE / part).rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _tag(dump=None):
    """The post-grad pass that puts the ops version into Inductor's cache keys and, with a dump, writes
    each graph Inductor lowers (``lowered-forward.txt``, ``lowered-backward.txt``) in the dump format."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from ..core.dump import format_graph

    class OpsVersionTag(CustomGraphPass):
        def __call__(self, graph) -> None:
            if dump is None:
                return None
            names = [n.name for n in graph.nodes if n.op == "placeholder"]
            kind = "backward" if any(n.startswith("tangents") for n in names) else "forward"
            dump.write_text(f"lowered-{kind}.txt", format_graph(
                graph, f"graph {dump.graph_id} | {kind} graph as Inductor lowers it (post-grad ATen)"))
            return None

        def uuid(self) -> str:
            return f"kernelpytorch-ops-{ops_version()}"

    return OpsVersionTag()


def mode_config(mode: str) -> dict:
    if mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


RUNTIME_ASSERTS = {"size_asserts": "TORCHINDUCTOR_SIZE_ASSERTS", "alignment_asserts": "TORCHINDUCTOR_ALIGNMENT_ASSERTS"}


def inference_asserts_off(patches: dict, example_inputs, config_module) -> None:
    """For an inference graph, ``RUNTIME_ASSERTS`` off unless the caller's patches or environment set them."""
    if decompositions.training(example_inputs):
        return
    for name, env in RUNTIME_ASSERTS.items():
        if hasattr(config_module, name) and name not in patches and env not in os.environ:
            patches[name] = False


def lower(gm, example_inputs, mode: str, inductor_config: dict, dump=None):
    import torch._inductor.config as inductor_config_module
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.compile_fx import compile_fx

    patches = mode_config(mode)
    patches.update(inductor_config)
    inference_asserts_off(patches, example_inputs, inductor_config_module)
    if "post_grad_custom_post_pass" not in patches and inductor_config_module.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _tag(dump)
        if dump is not None:  # a cache hit would skip the pass that writes the lowered graphs
            patches.setdefault("fx_graph_cache", False)
    loaded = len(PyCodeCache.modules)
    table = decompositions.table(example_inputs, patches, gm)
    with decompositions.cache_guard(gm):
        fn = compile_fx(gm, list(example_inputs), config_patches=patches or None,
                        **({"decompositions": table} if table is not None else {}))
    if dump is not None:
        paths = [getattr(m, "__file__", "") for m in PyCodeCache.modules[loaded:]]
        dump.write_text("lowered-code.txt", "# the code Inductor generated for this graph (the forward; a backward "
                        "compiled at its first call is not listed)\n" + "".join(f"{p}\n" for p in paths if p))
    return fn
