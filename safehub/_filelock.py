"""One file lock for every "only one process at a time" in safehub: cache folders, the trusted
list, checkpoint downloads.

A waiter says so in the log every ``constants.LOCK_LOG_EVERY_S`` seconds (huggingface_hub's
``WeakFileLock`` does the same), so a lock held by a stuck or far-away process is visible instead
of looking like a hang. The lock is ``filelock.FileLock``: an ``flock`` on ``lock_path``, released
by the kernel when its holder dies, so a killed process never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import filelock

from . import _log, constants


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold the file lock at ``lock_path`` for the block; ``what`` names the thing it guards in the log.

    Waits as long as another thread or process holds it, logging every few seconds while it
    waits. The lock file's folders are created if missing.

    Example:
        >>> with locked("/tmp/x.lock", "x"):  # doctest: +SKIP
        ...     ...  # no other holder of /tmp/x.lock runs here
    """
    lock = filelock.FileLock(os.fspath(lock_path))
    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=constants.LOCK_LOG_EVERY_S)
            break
        except filelock.Timeout:
            _log.info(f"Still waiting for lock on {what} ({time.monotonic() - started:.0f} s): "
                      f"another process holds {os.fspath(lock_path)}.")
    try:
        yield
    finally:
        lock.release()
