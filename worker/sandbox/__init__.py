"""The sandbox layers a worker applies to itself (``confine.apply_sandbox`` is the one hook)."""
