"""Confine the worker before any repository code runs. Standard library only.

``apply_sandbox`` is THE hook for the sandbox layers (DESIGN 5): the worker calls it once, in the
forked, single-threaded work process, after the request arrived and before ``hubconf.py`` is
imported. Today it applies the "process" layer's share that belongs here (every descriptor but
stdio and the channel closed, umask 077, no core dumps). The namespace, Landlock, seccomp and
rlimit layers go in the marked place below, read their limits from ``settings`` (the
``Sandbox.to_settings()`` dict plus ``repo_dir`` and ``scratch_dir``) and add their names to
the list returned, which the worker checks against ``settings["require"]``.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Iterable


def close_other_fds(keep: Iterable[int]) -> None:
    """Close every file descriptor not in ``keep``."""
    # Inherited handles (a parent's sockets, files, pipes) would let the repository reach them.
    keep = set(keep)
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(_fd_ceiling()))
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _fd_ceiling() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if 0 < soft < 1 << 20 else 1 << 20


def no_core_dumps() -> None:
    # A core file would write the worker's memory (and whatever it read) to disk.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def apply_sandbox(settings: dict[str, Any], *, keep_fds: Iterable[int]) -> list[str]:
    """Apply every available layer; return the names of those applied."""
    applied: list[str] = []
    close_other_fds(keep_fds)
    os.umask(0o077)  # files the worker creates are its own, even in a shared /tmp
    no_core_dumps()
    applied.append("process")
    # ---- sandbox layers go here, in this order (each appends its name when it is in force) ----
    # namespaces (user, net, ipc, pid, mount) -> Landlock -> rlimits (memory_limit, cpu_time,
    # max_processes, max_open_files, max_file_size) -> seccomp last, since it forbids the calls
    # the layers before it need.
    # ---------------------------------------------------------------------------------------------
    return applied
