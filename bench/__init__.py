"""The benchmark harness: ``python -m bench --help``.

Every speed claim of the project comes from here: each case runs under
eager, Inductor and kernelpytorch side by side in one process.
"""
