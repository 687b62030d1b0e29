"""The supervisor of one call: the first layers, one fork, and the end of the whole tree.

A cold worker's supervisor is the interpreter the parent starts (``main``; it never imports
torch); a warm one is a fork of the zygote, made for its call or ahead of it (a spare,
``zygote.py``). It watches the parent through a pidfd and kills the whole tree if the parent dies
(where pidfds are missing it has a parent-death signal instead), it is the child subreaper, every
descriptor but stdio and what the work needs closed, no core dumps. It enters the call's memory
cgroup and unshares its namespaces (``confine.prepare``), then forks once: the work process
(``work.py``, which applies the rest of the sandbox before any repository code runs), or, in a
new pid namespace, the namespace's init (pid 1, ``confine.become_init``), which forks the work as
pid 2. When its child ends, for any reason, nothing of the tree is left (a namespace's processes
die with its init, which the kernel makes wait for them; without one every descendant
re-parents here and is killed), and it mirrors the work's fate.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, NoReturn

from . import work
from .protocol import EXIT_SUPERVISOR, EXIT_USAGE, WorkerSettings
from .sandbox import confine
from .sandbox.confine import close_other_fds, no_core_dumps
from .sandbox.libc import prctl

_ARGS = ("--channel-fd", "--parent-pid", "--settings")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> NoReturn:
    """A cold worker's supervisor: ``--channel-fd FD --parent-pid PID --settings JSON``."""
    try:
        opts = _parse_args(argv)
        settings = WorkerSettings.from_json(opts["--settings"])
        channel_fd, parent_pid = int(opts["--channel-fd"]), int(opts["--parent-pid"])
    except (ValueError, KeyError) as exc:
        print(f"safehub worker: bad command line: {exc}", file=sys.stderr)
        os._exit(EXIT_USAGE)
    try:
        # The supervisor outlives its parent just long enough to kill the tree: a pidfd tells it
        # the parent is gone. Where pidfds are missing (Linux < 5.3) it dies with the parent.
        # Parent pid 0: bubblewrap stands between, and its --die-with-parent takes the tree down.
        parent_fd = _watch_parent(parent_pid) if parent_pid else None
        if parent_pid and os.getppid() != parent_pid:
            os._exit(EXIT_SUPERVISOR)  # it died before the watch took hold
    except OSError as exc:
        print(f"safehub worker: supervisor failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SUPERVISOR)
    supervise(parent_fd, confine.shape_of(settings), (channel_fd,), lambda prepared: work.Call(settings, channel_fd))


def supervise(
    parent_fd: int | None, shape: confine.Shape, keep: tuple[int, ...], take: Callable[[confine.Prepared], work.Call]
) -> NoReturn:
    """Be the supervisor of one call: prepare ``shape``, fork, wait, leave nothing, mirror the end.

    ``parent_fd`` is a pidfd of the caller (None: bubblewrap or a death signal watches it);
    ``keep``: the descriptors the work needs (the channel; on the warm path the zygote's socket),
    closed here once it is forked; ``take`` runs in the work process and gives it its call.
    """
    try:
        if parent_fd is not None and _readable(parent_fd):
            os._exit(EXIT_SUPERVISOR)  # the caller is already gone: nobody waits for an answer
        # Orphans of the work process re-parent here, where they can be found and killed.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        close_other_fds((0, 1, 2, *keep) + ((parent_fd,) if parent_fd is not None else ()))
        no_core_dumps()
        prepared = confine.prepare(shape)
        me = os.pidfd_open(os.getpid())
        status_r, status_w = os.pipe() if prepared.pid_ns else (-1, -1)
        child = os.fork()
    except OSError as exc:
        print(f"safehub worker: supervisor failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SUPERVISOR)
    if child == 0:
        if parent_fd is not None:
            os.close(parent_fd)
        if prepared.pid_ns:
            os.close(status_r)
            confine.become_init(prepared, status_w, me)  # returns in the work process, pid 2
        else:
            confine.watch_parent(me)
        work.run_work_process(take, prepared)
    os.close(me)
    for fd in keep + ((status_w,) if prepared.pid_ns else ()):
        os.close(fd)  # only the work process speaks; the parent sees EOF once it is gone
    status = _wait_for(child, parent_fd)
    if prepared.pid_ns:
        # /proc here is the namespace's now (its init mounted it): never read pids from it. The
        # namespace's processes end with its init, which the kernel lets go only once they have.
        if status is None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        else:
            status = confine.read_init_status(child, status_r, status)
    else:
        _kill_descendants()
    if status is None:
        os._exit(EXIT_SUPERVISOR)  # the parent died: nobody waits for an answer
    _mirror(status)


def _parse_args(argv: list[str]) -> dict[str, str]:
    if len(argv) != 2 * len(_ARGS):
        raise ValueError(f"expected {' '.join(a + ' VALUE' for a in _ARGS)}")
    opts = dict(zip(argv[::2], argv[1::2], strict=True))
    if sorted(opts) != sorted(_ARGS):
        raise ValueError(f"expected the options {', '.join(_ARGS)}")
    return opts


def _readable(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _watch_parent(parent_pid: int) -> int | None:
    try:
        return os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return None


def _wait_for(worker: int, parent_fd: int | None) -> int | None:
    """The work process's wait status, or None once the parent is gone (the tree must die)."""
    if parent_fd is None:
        while True:
            pid, status = os.waitpid(-1, 0)  # also reaps orphans that re-parented here meanwhile
            if pid == worker:
                return status
    import select

    worker_fd = os.pidfd_open(worker)
    poller = select.poll()
    poller.register(parent_fd, select.POLLIN)
    poller.register(worker_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll(1000)}
        while True:  # reap orphans that re-parented here and ended, and perhaps the worker
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == worker:
                return status
            if pid == 0:
                break
        if parent_fd in ready:
            return None


def _kill_descendants() -> None:
    """SIGKILL every process below this one until none is left (they re-parent here)."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no child at all: any live descendant would have re-parented here as one
    me = os.getpid()
    while True:
        pids = _descendants(me)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            reaped, _ = os.waitpid(-1, 0 if pids else os.WNOHANG)
            while reaped:
                reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            if not pids:
                return
            continue
        if not pids:
            time.sleep(0.001)  # a child forked after the scan: look again


def _descendants(root: int) -> list[int]:
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN, so read every stat instead.
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # The command name may hold spaces and ')'; the fields after the last ')' are fixed.
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _mirror(status: int) -> NoReturn:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to terminate
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_SUPERVISOR)
