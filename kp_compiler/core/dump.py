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
    graph-000/lowered-forward.txt  Inductor lowering: the forward (or inference) graph it lowers, post-grad
    graph-000/lowered-backward.txt Inductor lowering, training: the backward graph it lowers
    graph-000/lowered-code.txt     Inductor lowering: the paths of the Python modules it generated
    report.json                    every graph compiled into this folder
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import warnings
from typing import Any, Iterator, Optional

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
    """Writes one compiled graph's files into ``<dump_dir>/graph-NNN/``.

    A folder that stops being writable (disk full, removed) never fails a
    compile: the first failed write warns once and the rest are skipped.
    """

    def __init__(self, dump_dir: str, graph_id: int, folder: Optional[str] = None):
        self.folder = folder or os.path.join(dump_dir, f"graph-{graph_id:03d}")
        os.makedirs(self.folder, exist_ok=True)
        self.graph_id = graph_id
        self._step = 0
        self.broken = ""

    @classmethod
    def create(cls, dump_dir: str) -> "Optional[GraphDump]":
        """A dump in the next free ``graph-NNN`` folder of ``dump_dir`` (None, with a warning, if that fails).

        The folder is claimed with ``os.mkdir``, which fails if it exists, so
        processes dumping into one directory never share a number.
        """
        try:
            os.makedirs(dump_dir, exist_ok=True)
            graph_id = next_graph_id(dump_dir)
            while True:
                folder = os.path.join(dump_dir, f"graph-{graph_id:03d}")
                try:
                    os.mkdir(folder)
                    return cls(dump_dir, graph_id, folder)
                except FileExistsError:
                    graph_id += 1
        except OSError as e:
            _warn_once(f"kp_compiler: cannot dump into {dump_dir!r} ({e}); compiling without dumps")
            return None

    def write(self, name: str, graph: fx.Graph, header: str, numbered: bool = True) -> Optional[str]:
        if numbered:
            fname = f"{self._step:02d}-{_slug(name)}.txt"
            self._step += 1
        else:
            fname = f"{_slug(name)}.txt"
        return self.write_text(fname, format_graph(graph, f"graph {self.graph_id} | {header}"))

    def write_text(self, fname: str, text: str) -> Optional[str]:
        if self.broken:
            return None
        path = os.path.join(self.folder, fname)
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            self.broken = str(e)
            _warn_once(f"kp_compiler: cannot write dumps into {self.folder!r} ({e}); skipping the rest")
            return None
        return path


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg in _warned:
        return
    _warned.add(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def next_graph_id(dump_dir: str) -> int:
    """The first ``graph-NNN`` number after every one taken in ``dump_dir``."""
    os.makedirs(dump_dir, exist_ok=True)
    taken = [int(m.group(1)) for f in os.listdir(dump_dir) if (m := re.fullmatch(r"graph-(\d+)", f))]
    return max(taken, default=-1) + 1


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (``fcntl``; no lock where it is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: per-process temporary files and the atomic replace still hold
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_report(dump_dir: str, record: dict) -> Optional[str]:
    """Add one graph's record to ``<dump_dir>/report.json`` (created if absent).

    Safe across processes: the read-modify-write holds a lock
    (``report.json.lock``), the new text goes to a per-process temporary file
    that atomically replaces the report. A report that is not valid JSON is
    kept aside as ``report.json.damaged-<time>`` with a warning and a new one
    is started. A failure to write warns once and returns None: a dump never
    stops a compile.
    """
    path = os.path.join(dump_dir, "report.json")
    try:
        with _locked(path + ".lock"):
            report = _read_report(path)
            report["graphs"].append(record)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)
            os.replace(tmp, path)
    except OSError as e:
        _warn_once(f"kp_compiler: cannot write {path!r} ({e}); the report of this graph is not saved")
        return None
    return path


def _read_report(path: str) -> dict:
    fresh = {"version": 1, "graphs": []}
    if not os.path.exists(path):
        return fresh
    try:
        with open(path) as f:
            report = json.load(f)
        if isinstance(report, dict) and isinstance(report.get("graphs"), list):
            return report
        why = "not a kp_compiler report"
    except (ValueError, UnicodeDecodeError) as e:
        why = f"not valid JSON: {e}"
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(path, aside)
    warnings.warn(f"kp_compiler: {path} was {why}; kept it as {aside} and started a new report", RuntimeWarning,
                  stacklevel=4)
    return fresh
