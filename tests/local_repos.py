"""Hub repositories written straight to disk, and the in-process import to compare a worker with."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from safehub._worker import hubconf as in_process


def write_repo(root: Path, files: dict[str, str]) -> Path:
    """Write ``{relative path: source}`` (dedented) under ``root``; return ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@contextlib.contextmanager
def imported_in_process(repo: Path) -> Iterator[ModuleType]:
    """Import a hubconf here the way torch.hub does, then forget every module it brought in
    (but torch's own, which it imports lazily, e.g. on a first ``torch.jit.trace``, and which
    register operators that cannot be registered twice)."""
    before = set(sys.modules)
    try:
        with in_process.prepended_sys_path(str(repo)):
            yield in_process.import_hubconf(str(repo))
    finally:
        for name in set(sys.modules) - before:
            if name != "torch" and not name.startswith("torch."):
                del sys.modules[name]
