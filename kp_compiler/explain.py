"""``explain``: compile a model once and say exactly what the backend did.

    >>> report = kp_compiler.explain(model, x)
    >>> print(report)
    kernelpytorch explain: 1 graph(s), 0 graph break(s)
    graph 0 (record 0)  lowering=inductor  mode=default  nodes 14 -> 12  compile 812.4 ms
      pass               status  matches      ms
      noop-elimination   ok            2    0.41
          mul-by-one (noop.py:58)  x1
    ...
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .core.report import GraphRecord, collect
from .runtime import host_time

log = logging.getLogger(__name__)


@dataclass
class ExplainReport:
    """What happened when the model was compiled and run once."""

    graphs: list = field(default_factory=list)  # GraphRecord per compiled graph
    graph_breaks: dict = field(default_factory=dict)  # reason -> count
    output: Any = None
    fp8_events: dict = field(default_factory=dict)  # module path -> {role: count}, delayed/static FP8 layers
    host_time: Any = None  # runtime.host_time.HostGpu of the compiled call (CUDA, default mode), else None

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    @property
    def graph_break_count(self) -> int:
        return sum(self.graph_breaks.values())

    def to_json(self) -> dict:
        return {
            "graphs": [g.to_json() for g in self.graphs],
            "graph_breaks": dict(self.graph_breaks),
        }

    def __str__(self) -> str:
        lines = [
            f"kernelpytorch explain: {self.graph_count} graph(s), "
            f"{self.graph_break_count} graph break(s)"
        ]
        for reason, count in self.graph_breaks.items():
            lines.append(f"  graph break x{count}: {_one_line(reason)}")
        for hint in hints(self.graph_breaks):
            lines.append(f"  hint: {hint}")
        for i, g in enumerate(self.graphs):
            lines.extend(_graph_lines(i, g))
        if self.host_time is not None:
            lines.append(f"the compiled call, timed: {host_time.verdict(self.host_time)}")
        if self.fp8_events:
            lines.append("fp8 overflow events (non-finite or zero amax; the previous scale was kept):")
            for path, counts in self.fp8_events.items():
                lines.append(f"  {path}: " + " ".join(f"{role}={n}" for role, n in counts.items()))
        return "\n".join(lines)


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _graph_lines(index: int, g: GraphRecord) -> list[str]:
    """``graph N``: N counts this report's graphs from 0; ``record`` is the process-wide compile number."""
    lines = [
        f"graph {index} (record {g.id})  lowering={g.lowering}  mode={g.mode}  nodes {g.nodes_in} -> {g.nodes_out}"
        f"  compile {g.compile_ms:.1f} ms" + (f"  dump={g.dump}" if g.dump else "")
    ]
    if g.passes:
        width = max(len("pass"), *(len(p.name) for p in g.passes))
        lines.append(f"  {'pass':<{width}}  {'status':<11}  {'matches':>7}  {'ms':>8}")
        for p in g.passes:
            lines.append(f"  {p.name:<{width}}  {p.status:<11}  {p.matches:>7}  {p.ms:>8.2f}")
            for rule, n in p.by_rule.items():
                lines.append(f"      {rule}  x{n}")
            for note in p.notes:
                lines.append(f"      {_one_line(note)}")
            if p.reason:
                lines.append(f"      reason: {_one_line(p.reason)}")
    for skip in g.skipped:
        lines.append(f"  left out {skip['pass']}: {_one_line(skip['reason'])}")
    for guard in g.guards:
        lines.append(f"  runtime guard on input {guard['input']}: {_one_line(guard['reason'])}")
    for added in g.guards_added:
        lines.append(f"  shape guard added by {added['step']}: {added['guard']}")
    if g.buckets is not None:  # options["cudagraph_buckets"]
        if "sizes" in g.buckets:
            lines.append(f"  batch buckets: {g.buckets['sizes']} (one CUDA graph each, inputs padded)")
            if g.buckets.get("runtime"):
                lines.append("    " + bucket_counts(g.buckets["runtime"]))
        else:
            lines.append(f"  batch buckets not used: {_one_line(g.buckets['why'])}")
    if g.parts is not None:  # tensor parallelism
        lines.append(f"  DTensor graph: passes ran on {g.parts['rewritten']} of {g.parts['plain']} parts that "
                     "compute on plain tensors; DTensor parts lowered as captured")
        lines += [f"    kept as captured: {_one_line(why)}" for why in g.parts["kept"]]
        local = g.parts.get("local_linears") or {"colwise": 0, "rowwise": 0, "kept": []}
        if local["colwise"] or local["rowwise"]:
            lines.append(f"  tensor-parallel linears computed on local shards: {local['colwise']} column-parallel, "
                         f"{local['rowwise']} row-parallel ({local['copies']} shared input copies"
                         + (f", {local['scatters']} token reduce-scatters" if local.get("scatters") else "") + ")")
        elif g.parts.get("local_why"):
            lines.append(f"  tensor-parallel linears kept as DTensor ops: {_one_line(g.parts['local_why'])}")
        lines += [f"    kept as a DTensor op: {_one_line(why)}" for why in local["kept"]]
    for c in g.checkpoints:
        state = "kept" if c["kept"] else f"kept as captured: {_one_line(c['why'])}" if c["why"] else "none"
        lines.append(f"  activation-checkpointed region {c['region']}: {c['rewrites']} rewrite(s) inside, {state}")
    for why in g.fallbacks:
        lines.append(f"  fallback: {_one_line(why)}")
    return lines


def bucket_counts(stats: dict) -> str:
    """One line from ``GraphBuckets.stats``: graphs captured, replays, calls per bucket, runs above the
    largest bucket (no CUDA graph), and the shared pool's memory where known."""
    calls = ", ".join(f"{size}: {n}" for size, n in sorted(stats.get("calls", {}).items())) or "none"
    pool = stats.get("pool_bytes")
    return (f"captured {stats.get('captures', 0)}, replays {stats.get('replays', 0)}, calls per bucket {{{calls}}}, "
            f"above the largest {stats.get('above_largest', 0)} (run without CUDA graphs)"
            + (f", pool {pool / 2**20:.1f} MiB" if pool is not None else ""))


def explain(model_or_fn: Callable, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the kernelpytorch backend, run it once, report.

    Args:
        model_or_fn: an ``nn.Module`` or function.
        *example_inputs: positional inputs for one call.
        **options: backend options (``lowering=``, ``passes=``, ``mode=``, ...).

    Returns:
        An ``ExplainReport``; ``print()`` it for a table of graphs, graph
        breaks with reasons, passes with matches and time, lowerings and
        fallbacks. ``report.output`` holds the call's result.

    Dynamo's caches are reset first so that every graph is compiled afresh.
    On CUDA in default mode, for a module in eval mode (whose state more calls do not change), the compiled
    call is then timed (``runtime/host_time.py``: 21 more forward calls in the caller's grad mode) and the
    report says whether it is host-bound and what ``mode="reduce-overhead"`` could give.
    """
    from torch._dynamo.utils import counters

    from . import fp8
    from .backend import kernelpytorch

    torch._dynamo.reset()
    # Dynamo counts ordinary breaks under "graph_break"; a break inside a loop makes it skip
    # the frame, which it counts under "unimplemented" (that is how expert loops split).
    kinds = ("graph_break", "unimplemented")
    before = {k: Counter(counters[k]) for k in kinds}
    compiled = torch.compile(model_or_fn, backend=kernelpytorch, options=options or None)
    with collect() as records:
        output = compiled(*example_inputs)
    breaks = Counter()
    for k in kinds:
        now = Counter(counters[k])
        now.subtract(before[k])
        breaks.update({reason: n for reason, n in now.items() if n > 0})
    fp8_events = fp8.events(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else {}
    timed = None
    device = _cuda_device(output, example_inputs)
    eval_module = isinstance(model_or_fn, torch.nn.Module) and not model_or_fn.training
    if options.get("mode", "default") == "default" and device is not None and eval_module:
        try:  # 21 more forward calls, in the caller's grad mode; an eval-mode module keeps its state
            timed = host_time.measure(lambda: compiled(*example_inputs), device)
        except Exception as e:  # noqa: BLE001  (the report stands without the timing)
            log.warning("explain: timing the compiled call failed (%s: %s)", type(e).__name__, e)
    return ExplainReport(graphs=list(records), graph_breaks=dict(breaks), output=output, fp8_events=fp8_events,
                         host_time=timed)


def _cuda_device(*values: Any):
    """The device of the first CUDA tensor in ``values`` (outputs first), or None."""
    for t in torch.utils._pytree.tree_leaves(values):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return t.device
    return None


def hints(graph_breaks: dict) -> list:
    """What setting or code change would capture more in one graph, from the break reasons."""
    out = []
    if any("nonzero" in r or "Dynamic shape operator" in r for r in graph_breaks):
        out.append(
            "an op with a data-dependent output shape (torch.where/nonzero on routing ids, as in an "
            "expert loop) split the graph: set torch._dynamo.config.capture_dynamic_output_shape_ops = True "
            "to capture the loop whole (kernelpytorch's moe-dispatch pass then sees every expert)"
        )
    return out
