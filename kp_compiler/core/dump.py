"""The one text format for graphs, and the dump folder layout.

One node per line, so FileCheck can match it::

    # kp_compiler graph 0 | after noop-elimination | status ok | matches 1
    %l_x_ = input() : f32[s0, 16]
    %linear = aten.linear.default(%l_x_, %w, %b) : f32[s0, 32]
    %gelu = aten.gelu.default(%linear, approximate='tanh') : f32[s0, 32]
    return (%gelu)

A node may end with ``  # <note>``: a pass's remark kept in ``meta["kp_note"]``
(the attention pass notes the lifted ``mask_mod`` and the chosen kernel).

Layout under the dump directory (``KP_DUMP_DIR`` or ``options["dump_dir"]``)::

    graph-000/dynamo.txt           the graph Dynamo handed over (torch IR)
    graph-000/00-input.txt         canonical ATen IR, before any pass
    graph-000/01-<pass>.txt        the graph after each pass, in run order
    report.json                    every graph compiled into this folder
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import fx

_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
    torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
    torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8",
    torch.complex64: "c64", torch.complex128: "c128",
}


def format_value(v: Any) -> str:
    """``f32[s0, 16]`` for tensors, ``int s0`` for SymInts, tuples in parens."""
    if isinstance(v, torch.Tensor):
        dtype = _DTYPES.get(v.dtype, str(v.dtype).replace("torch.", ""))
        return f"{dtype}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"{type(v).__name__.replace('Sym', '').lower()} {v}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(format_value(x) for x in v) + ")"
    if v is None:
        return "none"
    return type(v).__name__


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if isinstance(t, str):
        return f"{node.op}[{t}]"
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
    return f"{module}.{name}" if module and module != "builtins" else name


def _format_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_format_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, float) and a in (float("inf"), float("-inf")):
        return "inf" if a > 0 else "-inf"
    return repr(a)


def format_node(node: fx.Node) -> str:
    if node.op == "output":
        outs = node.args[0]
        outs = outs if isinstance(outs, (list, tuple)) else (outs,)
        return "return (" + ", ".join(_format_arg(o) for o in outs) + ")"
    if node.op == "placeholder":
        call = "input()"
    else:
        parts = [_format_arg(a) for a in node.args]
        parts += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
        call = f"{_target_name(node)}({', '.join(parts)})"
    meta = node.meta.get("val", node.meta.get("example_value"))
    note = node.meta.get("kp_note")  # a pass's one-line remark, e.g. the lifted mask_mod
    return f"%{node.name} = {call} : {format_value(meta)}" + (f"  # {note}" if note else "")


def format_graph(graph: fx.Graph, header: str = "") -> str:
    lines = [f"# kp_compiler {header}"] if header else []
    lines += [format_node(n) for n in graph.nodes]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class GraphDump:
    """Writes one compiled graph's files into ``<dump_dir>/graph-NNN/``."""

    def __init__(self, dump_dir: str, graph_id: int):
        self.folder = os.path.join(dump_dir, f"graph-{graph_id:03d}")
        os.makedirs(self.folder, exist_ok=True)
        self.graph_id = graph_id
        self._step = 0

    def write(self, name: str, graph: fx.Graph, header: str, numbered: bool = True) -> str:
        if numbered:
            fname = f"{self._step:02d}-{_slug(name)}.txt"
            self._step += 1
        else:
            fname = f"{_slug(name)}.txt"
        path = os.path.join(self.folder, fname)
        with open(path, "w") as f:
            f.write(format_graph(graph, f"graph {self.graph_id} | {header}"))
        return path


def next_graph_id(dump_dir: str) -> int:
    """The first ``graph-NNN`` number not yet taken in ``dump_dir``."""
    os.makedirs(dump_dir, exist_ok=True)
    taken = [int(m.group(1)) for f in os.listdir(dump_dir) if (m := re.fullmatch(r"graph-(\d+)", f))]
    return max(taken, default=-1) + 1


def append_report(dump_dir: str, record: dict) -> str:
    """Add one graph's record to ``<dump_dir>/report.json`` (created if absent)."""
    path = os.path.join(dump_dir, "report.json")
    report = {"version": 1, "graphs": []}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report["graphs"].append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    return path
