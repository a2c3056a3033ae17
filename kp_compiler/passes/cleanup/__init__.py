"""Graph cleanups that clear the way for the other passes (``noop-elimination``)."""
