"""Which batch sizes get a bucket (``options["cudagraph_buckets"]``, ``runtime/buckets.py``)."""

from __future__ import annotations


def bucket_sizes(policy) -> list:
    """The sorted bucket sizes for ``policy``: a list of sizes, or ``"pow2:<max>"`` (1, 2, 4, ... up to max)."""
    if isinstance(policy, str):
        kind, _, top = policy.partition(":")
        if kind != "pow2" or not top.isdigit() or int(top) < 1:
            raise ValueError(f"bucket policy {policy!r}: give a list of sizes or 'pow2:<max>' (e.g. 'pow2:64')")
        sizes, size = [], 1
        while size <= int(top):
            sizes.append(size)
            size *= 2
        return sizes if sizes[-1] == int(top) else sizes + [int(top)]
    sizes = sorted(set(policy))
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"bucket sizes {list(policy)!r}: give positive ints")
    return sizes
