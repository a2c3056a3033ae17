"""Results out: JSON (with provenance), a markdown table, a PNG chart, and --compare."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from typing import Optional

import torch


def provenance(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("KP_GIT_COMMIT")  # set by callers whose copy has no .git (the device machine)
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(__file__)).stdout.strip()
            commit = out if re.fullmatch(r"[0-9a-f]{40}", out) else None
        except OSError:
            commit = None
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "triton": triton_version, "git_commit": commit, "python": platform.python_version()}


def _fmt(v, spec: str, missing: str = "") -> str:
    return missing if v is None else format(v, spec)


def _error_cell(row: dict) -> str:
    if row.get("missing_grads"):
        return f"FAIL: no gradient for {len(row['missing_grads'])} tensor(s) ({', '.join(row['missing_grads'][:3])})"
    return f"{row['error']:.2e}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {str(meta['git_commit'])[:10]}",
        "",
        f"Timing mode: {meta.get('timing', 'latency')} (bench/timing.py), "
        f"{meta.get('rounds', 1)} round(s): every backend of a case is compiled first, then all are timed "
        "in rounds with the order reversed each round, samples pooled. "
        "Median of repeated runs; 95% CI of the median in brackets; speedup vs Inductor default; "
        "error = relative L2 vs an fp64 (CPU) / fp32 (GPU) eager reference. Compile s = first call "
        "minus a steady-state call, with Inductor's FX graph and autograd caches off; its kernel cache is "
        "shared in the process, so a later backend may reuse kernels an earlier one compiled. "
        "Step GiB = the most memory one step allocates above what is held before it (GPU).",
        "",
        "| case | backend | median ms [95% CI] | vs inductor | TFLOP/s | GB/s | compile s | step GiB | rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        if case.get("failed"):
            lines.append(f"| {case['case']} | all | failed: {case['failed']} | | | | | | |")
            continue
        for r in case["rows"]:
            if r.get("failed"):
                lines.append(f"| {case['case']} | {r['backend']} | failed: {r['failed'][:120]} | | | | | | |")
                continue
            lo, hi = r["ci95_ms"]
            lines.append(
                f"| {case['case']} | {r['backend']} | {r['median_ms']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"| {_fmt(r.get('speedup_vs_inductor'), '.2f')}x | {_fmt(r.get('tflops'), '.3g')} "
                f"| {_fmt(r.get('gb_per_s'), '.3g')} | {r['compile_s']:.1f} | {_fmt(r.get('peak_mem_gb'), '.2f')} "
                f"| {_error_cell(r)} |"
            )
    fired = [(case["case"], r) for case in results["cases"] for r in case.get("rows", []) if r.get("passes") is not None]
    if fired:
        lines += ["", "Rewrites that fired (kernelpytorch rows, matches summed over graphs; an idle graph had nothing "
                  "any default pass could rewrite and was lowered as Dynamo captured it):", ""]
        lines += [f"- {c} / {r['backend']}: " + (", ".join(f"{k} x{v}" for k, v in r["passes"].items()) or "none")
                  + (f" ({r['idle_graphs']} of {r['graphs']} graph(s) idle)" if r.get("idle_graphs") else "")
                  + ("; CUDA-graph buckets: " + "; ".join(_buckets_text(b) for b in r["buckets"])
                     if r.get("buckets") else "")
                  for c, r in fired]
    compiles = [(case["case"], r) for case in results["cases"] for r in case.get("rows", []) if "compiles" in r]
    if compiles:
        lines += ["", "Dynamic-length cases (one step runs every length): graphs Dynamo compiled in the first step", ""]
        lines += [f"- {c} / {r['backend']}: {r['compiles']}" for c, r in compiles]
    return "\n".join(lines) + "\n"


def _buckets_text(b: dict) -> str:
    return f"sizes {b['sizes']}" if "sizes" in b else f"none ({b.get('why', '?')})"


def chart(results: dict, path: str) -> Optional[str]:
    """Bar chart of each backend's speedup vs Inductor per case; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [c for c in results["cases"] if not c.get("failed")]
    backends = sorted({r["backend"] for c in cases for r in c["rows"]} - {"inductor"})
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(cases) * max(1, len(backends))), 5))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        ys = [next((r.get("speedup_vs_inductor", 0) for r in c["rows"] if r["backend"] == b), 0) for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=b)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(cases))])
    ax.set_xticklabels([c["case"] for c in cases], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs Inductor (higher is better)")
    meta = results["meta"]
    ax.set_title(f"{meta['device_name']}, torch {meta['torch']}")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(results: dict, baseline: dict) -> list[str]:
    """Cases whose speedup vs Inductor left the baseline's 95% interval."""
    base = {(c["case"], r["backend"]): r for c in baseline["cases"] for r in c.get("rows", [])}
    flags = []
    for c in results["cases"]:
        for r in c.get("rows", []):
            old = base.get((c["case"], r["backend"]))
            if not old or "speedup_vs_inductor" not in r or "speedup_ci95" not in old:
                continue
            lo, hi = old["speedup_ci95"]
            s = r["speedup_vs_inductor"]
            if not lo <= s <= hi:
                direction = "faster" if s > hi else "slower"
                flags.append(f"{c['case']} / {r['backend']}: {s:.2f}x vs baseline [{lo:.2f}, {hi:.2f}] ({direction})")
    return flags


def write(results: dict, out_dir: str, stem: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    png = chart(results, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths
