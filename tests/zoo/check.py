"""Run one zoo model under the backend and compare it with eager.

Forward logits and every parameter gradient (of a cross-entropy loss) are
compared by relative L2 error; the report says which passes fired, how
often, and how many graphs and graph breaks Dynamo made.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kp_compiler.core.report import collect
from kp_compiler.testing.compare import dynamo_config, grad_error, grads_of, missing_grads, rel_error

from .entries import Entry

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class ZooResult:
    name: str
    device: str
    dtype: str
    forward_error: float = float("nan")
    grad_error: float = float("nan")
    missing_grads: list = field(default_factory=list)  # None on one side only: a failure
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list = field(default_factory=list)
    passes: dict = field(default_factory=dict)  # pass name -> total matches
    rolled_back: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    idle_graphs: int = 0  # graphs with nothing any default pass could rewrite (lowered as Dynamo captured them)
    failed: str = ""

    def ok(self, tol: float) -> bool:
        return not self.failed and not self.missing_grads and self.forward_error < tol and self.grad_error < tol


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _run(model, ids):
    logits = _logits(model(ids))
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    grads = grads_of(getattr(model, "_orig_mod", model).named_parameters())  # names without "_orig_mod."
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def check(entry: Entry, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> ZooResult:
    from torch._dynamo.utils import counters

    result = ZooResult(entry.name, device, str(dtype).replace("torch.", ""))
    torch.manual_seed(0)
    model = entry.build().to(device, dtype)
    ids = torch.randint(0, entry.vocab, (2, 24), device=device)
    twin = copy.deepcopy(model)  # before the eager run: some models keep non-leaf caches after one
    ref_logits, ref_grads = _run(model, ids)
    torch._dynamo.reset()
    before = Counter(counters["graph_break"])
    try:
        with dynamo_config(entry.dynamo_config), collect() as records:
            compiled = torch.compile(twin, backend="kernelpytorch", options=options or None)
            logits, grads = _run(compiled, ids)
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        inner = getattr(e, "inner_exception", None) or e  # Dynamo wraps a backend's error
        text = " ".join(str(inner).split())[:400]
        result.failed = f"{type(inner).__name__}: {text}"
        return result
    breaks = Counter(counters["graph_break"])
    breaks.subtract(before)
    result.forward_error = rel_error([logits], [ref_logits])
    result.missing_grads = missing_grads(grads, ref_grads)
    result.grad_error = grad_error(grads, ref_grads)
    result.graphs = len(records)
    result.graph_breaks = sum(v for v in breaks.values() if v > 0)
    result.break_reasons = [k.splitlines()[0] for k, v in breaks.items() if v > 0]
    for rec in records:
        result.fallbacks += rec.fallbacks
        result.idle_graphs += any("nothing to rewrite" in s["reason"] for s in rec.skipped)
        for p in rec.passes:
            result.passes[p.name] = result.passes.get(p.name, 0) + p.matches
            if p.status != "ok":
                result.rolled_back.append(f"{p.name}: {p.reason}")
    return result
