"""Passes over linears: a linear and its activation as one op (``activation.py``)."""
