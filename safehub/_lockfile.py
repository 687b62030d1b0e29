"""Compatibility alias: the pin-file module is now :mod:`safehub._pins`.

Kept only for ``safehub/cli.py``, which is being split into a package on another branch; remove
this file once the CLI imports ``_pins``.
"""

from ._pins import LOCK_VERSION, Pin, dumps, pin_for, read

__all__ = ["LOCK_VERSION", "Pin", "dumps", "pin_for", "read"]
