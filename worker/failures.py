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
    """The ERROR reply for an exception the repository's code raised during ``phase``."""
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    return error("exception", message, type=type(exc).__name__, traceback=format_traceback(exc), phase=phase)


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
