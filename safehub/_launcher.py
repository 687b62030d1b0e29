"""How a cold worker is started: its command line, inside bubblewrap where that works.

bubblewrap gives the worker an empty root with only the system, Python, safehub's worker code,
the repository (read-only) and its scratch folder (read-write) bound in, fresh /proc, /dev, /tmp
and /dev/shm, and new user, pid, ipc, uts, cgroup and network namespaces. As root it also drops
the worker to uid 65534 (through ``setpriv``), since root is exempt from RLIMIT_NPROC. Where
bubblewrap is missing or refused, the worker enters the namespaces itself
(``safehub/_worker/confine.py``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._worker import namespaces

WORKER_MAIN = Path(__file__).resolve().parent / "_worker" / "main.py"
UNPRIVILEGED_UID = 65534


def worker_argv(settings: dict[str, Any], channel_fd: int) -> tuple[list[str], list[str]]:
    """(argv, layers applied by the launch) for a worker with these settings."""
    python = [sys.executable, "-I", "-B", str(WORKER_MAIN), "--channel-fd", str(channel_fd)]
    wanted = set(settings["layers"])
    wrap = {"namespaces", "bubblewrap"} <= wanted and bwrap_works()
    drop = os.geteuid() == 0 and "uid_drop" in wanted
    tail = ["--repo-dir", settings["repo_dir"], "--parent-pid", "0" if wrap else str(os.getpid())]
    if not wrap:
        return python + tail + ["--settings", _settings_json(settings, [])], []
    applied = ["namespaces", "bubblewrap"] + (["uid_drop"] if drop else [])
    argv = namespaces.bwrap_argv(
        settings["repo_dir"],
        settings["scratch_dir"],
        read_only_paths=[str(WORKER_MAIN.parent.parent), *settings.get("extra_read_paths", ())],
        network=bool(settings.get("network")),
        uid=UNPRIVILEGED_UID if drop else None,
    )
    return argv + python + tail + ["--settings", _settings_json(settings, applied)], applied


def _settings_json(settings: dict[str, Any], applied: list[str]) -> str:
    import json

    return json.dumps({**settings, "applied_by_parent": settings.get("applied_by_parent", []) + applied})


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """bubblewrap is installed and can make its namespaces here (checked once per process)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="safehub-bwrap-probe-") as scratch:
        try:
            argv = namespaces.bwrap_argv(scratch, scratch, uid=UNPRIVILEGED_UID if os.geteuid() == 0 else None)
            done = subprocess.run(argv + [sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, ValueError, subprocess.SubprocessError):
            return False
    return done.returncode == 0
