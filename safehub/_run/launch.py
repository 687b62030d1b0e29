"""How a worker is started: forked by the zygote (warm) or as a fresh interpreter (cold).

Warm is the default: the zygote (``warm.py``) forks a worker that enters the same
sandbox as a cold one, namespaces included (unshared in the forked, single-threaded child).
A call goes cold where the warm path would give it less: ``Sandbox(require=("bubblewrap",))``;
bubblewrap wanted without Landlock (only bubblewrap would hide the host's files then);
namespaces wanted but refused to a forked child while bubblewrap can make them; the zygote
switched off (``SAFEHUB_WARM=0``) or failing to start.

A cold worker runs inside bubblewrap where that works: an empty root with only the system,
Python, safehub's worker code, the repository (read-only) and its scratch folder (read-write)
bound in (the scratch folder a tmpfs of ``max_scratch_size`` instead, where bwrap can size one),
fresh /proc, /dev, /tmp and /dev/shm (tmpfs of 256 MiB at most each), and new user, pid, ipc,
uts, cgroup and network namespaces. As root it also drops the worker to uid 65534 (through
``setpriv``), since root is exempt from RLIMIT_NPROC. Where bubblewrap is missing or refused,
the worker enters the namespaces itself (``worker/sandbox/confine.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Union

from .. import _log
from .._bwrap import UNPRIVILEGED_UID, bwrap_argv, bwrap_features, bwrap_works
from .._worker import ENTRY_SCRIPT
from .._worker.protocol import BUBBLEWRAP_TMPFS_BYTES, WorkerSettings
from . import memory_cgroup, warm

TMPFS_SIZE = BUBBLEWRAP_TMPFS_BYTES  # bytes of each of /tmp and /dev/shm in bubblewrap (tmpfs: memory)


class ColdProcess:
    """A cold worker's Popen, with the interface it shares with ``warm.WarmProcess``."""

    def __init__(self, popen: subprocess.Popen[bytes], wrapped: bool) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdout: IO[bytes] = popen.stdout  # type: ignore[assignment]
        self.stderr: IO[bytes] = popen.stderr  # type: ignore[assignment]
        self.wrapped = wrapped  # bubblewrap reports a death by signal N as exit code 128 + N

    def running(self) -> bool:
        # poll() reaps an exited worker; only a live (unreaped) pid is ours to kill.
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Popen's returncode (negative: the signal); ``subprocess.TimeoutExpired`` past ``timeout``."""
        code = self.popen.wait(timeout=timeout)
        return 128 - code if self.wrapped and 128 < code < 128 + 65 else code

    def kill(self) -> None:
        self.popen.kill()


WorkerProcess = Union[ColdProcess, "warm.WarmProcess"]


def start_worker(
    settings: WorkerSettings, environ: dict[str, str], cwd: Path, memory_limit: int | None
) -> tuple[WorkerProcess, socket.socket, memory_cgroup.MemoryCgroup | None]:
    """Start a worker for one call: (its process, the parent's end of its channel, its memory
    cgroup of ``memory_limit`` bytes where one can be had: the caller removes it).

    Raises OSError where even a cold worker cannot start.
    """
    zygote = warm.acquire() if "bubblewrap" not in settings.require else None
    if zygote is not None and _warm_gives_enough(zygote, settings):
        sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            warm_proc, cgroup = zygote.spawn(settings, environ, child.fileno(), memory_limit)
            return warm_proc, sock, cgroup
        except warm.Unavailable as exc:
            # Whatever it may have forked sees this channel close and ends; this call goes cold.
            sock.close()
            warm.discard(zygote)
            _log.warning(f"{exc}; this call starts cold")
        except BaseException:
            sock.close()
            raise
        finally:
            child.close()
    cgroup = memory_cgroup.MemoryCgroup.create(memory_limit) if memory_limit else None
    if cgroup is not None:
        settings = settings.replace(memory_cgroup=str(cgroup.path))
    try:
        cold_proc, sock = _start_cold(settings, environ, cwd)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    return cold_proc, sock, cgroup


def _warm_gives_enough(zygote: warm.Zygote, settings: WorkerSettings) -> bool:
    wanted = set(settings.layers)
    if not {"namespaces", "bubblewrap"} <= wanted or not bwrap_works():
        return True
    # bubblewrap hides the host's files; a warm worker relies on Landlock for that.
    if "landlock" not in wanted:
        return False
    # Where a forked child may not unshare, bubblewrap (setuid, or allowed by a profile) still can.
    return zygote.namespaces


def _start_cold(settings: WorkerSettings, environ: dict[str, str], cwd: Path) -> tuple[ColdProcess, socket.socket]:
    sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv, by_launch = worker_argv(settings, child.fileno())
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=(child.fileno(),),
            start_new_session=True,  # no controlling terminal, no signals from the caller's group
            env=environ,
            cwd=cwd,
        )
    except BaseException:
        sock.close()
        raise
    finally:
        child.close()
    return ColdProcess(popen, "bubblewrap" in by_launch), sock


def worker_argv(settings: WorkerSettings, channel_fd: int) -> tuple[list[str], list[str]]:
    """(argv, layers applied by the launch) for a worker with these settings."""
    # -B: a worker never writes .pyc files into the shared repository cache.
    python = [sys.executable, "-I", "-B", ENTRY_SCRIPT, "--channel-fd", str(channel_fd)]
    wanted = set(settings.layers)
    wrap = {"namespaces", "bubblewrap"} <= wanted and bwrap_works()
    drop = os.geteuid() == 0 and "uid_drop" in wanted
    tail = ["--parent-pid", "0" if wrap else str(os.getpid())]
    # A memory cgroup is entered by the launch command itself, so everything it starts is inside.
    join = memory_cgroup.join_argv(os.path.join(settings.memory_cgroup, "cgroup.procs")) if settings.memory_cgroup else []
    joined = ["memory_cgroup"] if join else []
    if not wrap:
        told = settings.replace(applied_by_parent=settings.applied_by_parent + tuple(joined))
        return join + python + tail + ["--settings", told.to_json()], joined
    applied = ["namespaces", "bubblewrap"] + (["uid_drop"] if drop else []) + joined
    # The scratch folder is a tmpfs inside (a resource limit: with rlimits), of the size the
    # memory bound gives it; /tmp and /dev/shm, tmpfs too, get no more than it.
    scratch_size = settings.memory_shares(in_bubblewrap=True).scratch if "rlimits" in wanted else None
    if scratch_size and bwrap_features().get("size"):
        applied.append("scratch_limit")
    argv = bwrap_argv(
        settings.repo_dir,
        settings.scratch_dir,
        read_only_paths=[os.path.dirname(ENTRY_SCRIPT), *([settings.view_dir] if settings.view_dir else []), *settings.extra_read_paths],
        network=settings.network,
        uid=UNPRIVILEGED_UID if drop else None,
        scratch_size=scratch_size,
        tmpfs_size=min(TMPFS_SIZE, scratch_size) if scratch_size else TMPFS_SIZE,
    )
    told = settings.replace(applied_by_parent=settings.applied_by_parent + tuple(applied))
    return join + argv + python + tail + ["--settings", told.to_json()], applied
