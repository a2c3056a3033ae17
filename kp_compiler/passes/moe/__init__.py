"""Mixture-of-experts dispatch: expert loops (``loop.py``), transformers' batched forms (``batched.py``), the dense masked form (``dense.py``), what they share (``common.py``)."""
