"""What the benchmark scripts share (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def forgetting_modules() -> Iterator[None]:
    """Like a fresh torch.hub call in a long-lived process: the repo's modules do not linger."""
    before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
