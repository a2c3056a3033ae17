"""What the backend did to each graph: passes, matches, time, fallbacks.

A ``GraphRecord`` is filled while one Dynamo graph is compiled. It goes to
``report.json`` when dumping is on, to every open ``collect()`` block (that is
how ``explain`` sees it), and to the ``kp_compiler`` logger.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

_ids = itertools.count()
_local = threading.local()


@dataclass
class PassRecord:
    name: str
    matches: int = 0
    ms: float = 0.0
    status: str = "ok"  # "ok" | "rolled_back" | "failed"
    reason: str = ""
    by_rule: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # per-site decisions a pass reports (fp8-linear: every linear)
    guards_added: list = field(default_factory=list)  # shape guards the pass added (core/shape_guards.py)


@dataclass
class GraphRecord:
    id: int
    lowering: str = ""
    mode: str = "default"
    nodes_in: int = 0
    nodes_out: int = 0
    passes: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    guards: list = field(default_factory=list)  # runtime guards the rewrites rely on
    skipped: list = field(default_factory=list)  # default passes left out here: {"pass", "reason"}
    guards_added: list = field(default_factory=list)  # {"step", "guard"}: shape guards a step added
    autograd_regions: int = 0  # custom autograd.Function / checkpoint calls kept whole (core/regions.py)
    # activation-checkpointed regions whose bodies the passes ran on (core/checkpoint_bodies.py):
    # {"region": key, "rewrites": n, "kept": bool, "why": ""} each
    checkpoints: list = field(default_factory=list)
    # options["cudagraph_buckets"]: {"sizes": [...], "runtime": GraphBuckets.stats} where used, else {"why": ...}
    buckets: Optional[dict] = None
    # DTensor inputs (tensor parallelism): {"plain": n, "rewritten": m, "kept": [why...]} (core/plain_regions.py)
    parts: Optional[dict] = None
    dump: Optional[str] = None
    compile_ms: float = 0.0

    def fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)

    def to_json(self) -> dict:
        return asdict(self)


def new_record() -> GraphRecord:
    return GraphRecord(id=next(_ids))


def _sinks() -> list:
    if not hasattr(_local, "sinks"):
        _local.sinks = []
    return _local.sinks


@contextlib.contextmanager
def collect() -> Iterator[list]:
    """Collect the ``GraphRecord`` of every graph compiled inside the block."""
    records: list = []
    _sinks().append(records)
    try:
        yield records
    finally:
        _sinks().remove(records)


def publish(record: GraphRecord) -> None:
    for sink in _sinks():
        sink.append(record)
