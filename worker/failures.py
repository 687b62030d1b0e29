"""A failure in the worker as a frame's fields: category, type, capped message, the repository's traceback.

Shared by the one-call conversation (``work.py``: ERROR) and a remote model's calls (``remote.py``:
FAILED), so the parent reads both the same way. Standard library only.
"""

from __future__ import annotations

import os
from typing import Any

from . import WORKER_DIR

MAX_MESSAGE = 64 * 1024
MAX_TRACEBACK = 256 * 1024


def error(category: str, message: str, **facts: Any) -> tuple[str, dict[str, Any], list[bytes], list[int]]:
    """An ERROR reply ``(kind, fields, buffers, fds)``: ``category`` and a capped message, plus ``facts``."""
    fields = {"error": category, "type": facts.pop("type", ""), "message": cap(message, MAX_MESSAGE)}
    fields["traceback"] = cap(facts.pop("traceback", ""), MAX_TRACEBACK, keep_tail=True)
    fields.update(facts)
    return ("error", fields, [], [])


def exception(phase: str, exc: BaseException) -> tuple[str, dict[str, Any], list[bytes], list[int]]:
    """The ERROR reply for an exception the repository's code raised during ``phase``; with
    ``limit`` (a Sandbox setting's name) when a limit of the sandbox caused it."""
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    facts: dict[str, Any] = {"phase": phase}
    limit = limit_behind(exc)
    if limit:
        facts["limit"] = limit
    return error("exception", message, type=type(exc).__name__, traceback=format_traceback(exc), **facts)


# Words of a failure that only a limit of the sandbox causes here (the worker has no other cause
# for them): an allocation refused by RLIMIT_AS/RLIMIT_DATA, a library that could not be mapped.
_OUT_OF_MEMORY = ("failed to map segment", "cannot allocate memory", "can't allocate memory", "std::bad_alloc",
                  "out of memory", "cannot map zero-fill pages")


def limit_behind(exc: BaseException) -> str:
    """The Sandbox setting whose limit made ``exc`` (or what it was raised from), or ""."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        limit = _limit_of(current)
        if limit:
            return limit
        current = current.__cause__ or current.__context__
        seen += 1
    return ""


def _limit_of(exc: BaseException) -> str:
    import errno

    if isinstance(exc, MemoryError):
        return "memory_limit"
    number = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if number == errno.ENOMEM:
        return "memory_limit"
    if number in (errno.EMFILE, errno.ENFILE):
        return "max_open_files"
    if number == errno.EFBIG:
        return "max_file_size"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "max_scratch_size"  # the worker writes nowhere but its scratch tmpfs
    try:
        text = str(exc).lower()
    except Exception:
        return ""
    if any(words in text for words in _OUT_OF_MEMORY):
        return "memory_limit"
    if "can't start new thread" in text or (number == errno.EAGAIN and _raised_by_fork(exc)):
        return "max_processes"
    return ""


def _raised_by_fork(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name in ("fork", "_launch", "_execute_child", "start", "_Popen")


def format_traceback(exc: BaseException) -> str:
    """The traceback as text, starting at the repository's frames (the worker's own are noise)."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_worker_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        return f"<traceback unavailable for {type(exc).__name__}>"
    for view, repo_dir in SHOWN_AS.items():  # the repository's own paths, not its view's (repo_view.py)
        text = text.replace(view + os.sep, repo_dir + os.sep)
    return text


SHOWN_AS: dict[str, str] = {}


def _is_worker_frame(filename: str) -> bool:
    return filename.startswith(WORKER_DIR + os.sep) or filename.startswith("<frozen importlib")


def cap(text: Any, limit: int, keep_tail: bool = False) -> str:
    """``text`` as a str of at most about ``limit`` characters, marked where it was cut."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return "[...]\n" + text[-limit:] if keep_tail else text[:limit] + "[...]"
