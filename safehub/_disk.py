"""A write that fails because the disk is full is the disk's fault: one translation, naming the folder.

Without it a full hub dir showed as whatever was writing at the time: a download "broke", an
extraction failed on one file, a library's own error. :func:`writing_in` wraps every place safehub
writes something large (a repository's archive and tree, a checkpoint fetched for a worker, the
command line's output files) and turns ENOSPC and EDQUOT into :class:`~safehub.errors.DiskFullError`
with the folder as its ``path``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from .errors import DiskFullError

_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a write refused for lack of space. A
    library's own error that carries no errno (safetensors' writer) is known by the OS's words."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if not isinstance(exc, OSError) and any(f"{words} (os error {number})" in str(exc) for number, words in _FULL.items()):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


@contextlib.contextmanager
def writing_in(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn a full disk met inside the block into DiskFullError naming ``folder`` and ``what``.

    Also a library's own error raised from ENOSPC (safetensors' writer), found through its cause."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(
            f"No space left on device in {folder} while writing {what}: free space there, or use "
            "another folder (for the hub dir: safehub.set_dir() or TORCH_HOME).",
            path=str(folder),
        ) from exc
