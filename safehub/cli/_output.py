"""How commands write: results on stdout (plain or ``--json``), everything else on stderr.

stdout holds only results, so a script can parse it: notes, progress bars and the repository's own
prints go to stderr. Output files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import _disk
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


# What an output file's extension says it holds, and how tensors are written in it. A name
# without an extension gets the command's default format, the first one listed.
TENSOR_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}


def check_output_path(path: Path, *, formats: dict[str, str] | None = None, option: str = "--output") -> str | None:
    """Refuse an ``--output`` that cannot be written, or whose extension names a format this
    command does not write: said before any download or worker, not after minutes of work.
    Returns the format the extension names (None when ``formats`` is None)."""
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; name a file.", exit_code=EXIT_USAGE)
    if not path.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {path.parent} does not exist.", exit_code=EXIT_ERROR)
    if formats is None:
        return None
    found = formats.get(path.suffix.lower()) if path.suffix else next(iter(formats.values()))
    if found is None:
        names = " or ".join(formats)
        raise CommandError(f"{option} {path}: the file name must end in {names}, which says what it holds "
                           f"(e.g. {path.with_suffix(next(iter(formats)))}).", exit_code=EXIT_USAGE)
    return found


def write_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Tensors into ``path`` in the format its extension names: safetensors (with ``metadata``), or
    ``torch.save`` of the dict for .pt/.pth (read back with ``torch.load(path, weights_only=True)``)."""
    kind = TENSOR_FORMATS.get(path.suffix.lower(), "safetensors")
    with atomic_output(path) as tmp:
        if kind == "safetensors":
            from safetensors.torch import save_file

            save_file(savable_tensors(tensors), str(tmp), metadata=metadata)
        else:
            import torch

            torch.save(dict(tensors), tmp)


def _umask() -> int:
    """This process's umask, read without changing it (another thread may be creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed onto it when the block succeeds, removed if not.

    The file gets the mode any tool's output would: an existing file's own mode (overwriting it
    keeps it), else 0666 less the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _disk.writing_in(path.parent, f"the output file {path.name}"):
            yield tmp
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
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
