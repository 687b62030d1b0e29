"""Process trees in tests: a worker's processes, and waiting until they are all gone."""

from __future__ import annotations

import time

import psutil


def tree_of(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and every descendant it has now."""
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def all_gone(processes: list[psutil.Process], timeout: float = 10.0) -> bool:
    """True once none of ``processes`` is alive (zombies count as gone), within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(alive(p) for p in processes):
            return True
        time.sleep(0.02)
    return False


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
