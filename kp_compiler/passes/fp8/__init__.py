"""FP8 cast insertion: the ``fp8-linear`` pass and its size table (``linear.py``)."""
