"""How commands write: results on stdout (plain or ``--json``), everything else on stderr.

stdout holds only results, so a script can parse it: notes, progress bars and the repository's own
prints go to stderr. Output files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import EXIT_ERROR, EXIT_USAGE, CommandError


def print_json(data: Any) -> None:
    # ensure_ascii: every control character in a value (the worker's strings) leaves as a \u escape.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=True) + "\n")


def note(text: str) -> None:
    """A human note on stderr (stdout holds only results)."""
    sys.stderr.write(text + "\n")


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While the repository's code runs, anything printed goes to stderr: stdout holds results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def check_output_path(path: Path) -> None:
    """Refuse an ``--output`` that cannot be written: said before any download or worker, not after
    minutes of work."""
    if path.is_dir():
        raise CommandError(f"--output {path} is a folder; name a file.", exit_code=EXIT_USAGE)
    if not path.parent.is_dir():
        raise CommandError(f"--output {path}: the folder {path.parent} does not exist.", exit_code=EXIT_ERROR)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed onto it when the block succeeds, removed if not."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def savable_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors, none sharing storage with another: what safetensors can write."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()  # tied weights: safetensors refuses shared storage
        seen.add(ptr)
        out[name] = tensor.contiguous()
    return out
