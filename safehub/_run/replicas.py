"""One remote model served by N replicas: ``safehub.load(..., returns="remote", replicas=N)``.

The model is loaded once, in one sandboxed worker, which then becomes the template
(``worker/replicas.py``): it serves no call, and forks N replicas that share its pages
copy-on-write, so the weights stay one copy. Each replica is a worker of its own for the parent:
its own channel, a :class:`~.session.RemoteSession` with its own time limit per call, its own
memory cgroup where cgroups are used (limited to ``memory_limit``), its own process limits, its
own Landlock domain nested in the worker's (its own writable folder; no ptrace, memory reads or
signals between replicas). :class:`ReplicaSet` gives each call to an idle replica: a call waits
until one is free, and a replica runs one call at a time.

A replica that ends (a call past its time limit, a crash, a limit, a broken reply) fails the call
it was running with the error a single worker gives, and leaves the set: it is not replaced
(replacing would hide a model that keeps crashing, at a fork per failure), and
``RemoteModule.replicas`` reports how many are left. The handle is gone once none is left; closing
it ends every replica and the template.

Where the worker cannot fork (no memory cgroup, so seccomp holds it to one address space, which is
what bounds its memory there) or has no Landlock (which keeps the replicas apart), ``replicas > 1``
is refused before anything is loaded, with the reason and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from .. import _log
from .._limit_errors import limit_error
from .._sandbox import Sandbox
from .._worker import protocol
from ..errors import InvalidArgumentError, ProtocolError, RemoteClosedError, SandboxError, WorkerCrashedError, WorkerError
from . import conversation, memory_cgroup
from .process import EXIT_GRACE_S, Worker
from .session import FETCH_REFUSED, SELF, RemoteSession, next_limit

MAX_REPLICAS = 256
# Calls that change the model's weights without returning the model: made on every replica.
EVERY_REPLICA = frozenset({"load_state_dict"})

REPLICATE = conversation.Exchange(
    protocol.REPLICATE, protocol.REPLICATED, protocol.FAILED,
    protocol.Limits(max_header_bytes=64 * 1024, max_header_nodes=1000, max_buffers=0, max_fds=1),
)


def check_replicas(replicas: object, returns: str, sandbox: Sandbox | None) -> int:
    """``replicas`` checked before anything is loaded: an int from 1 to MAX_REPLICAS, above 1 only for a
    remote model on a machine where the worker may fork.

    Raises:
        InvalidArgumentError: not such an int, or more than one without ``returns="remote"``.
        SandboxError: this machine's sandbox cannot give replicas (``layer`` says which part).
    """
    if type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgumentError(f"replicas must be an int from 1 to {MAX_REPLICAS}, not {replicas!r}.")
    if replicas == 1:
        return 1
    if returns != "remote" or sandbox is None:
        raise InvalidArgumentError(
            f"replicas={replicas} serves one remote model from several workers: it needs isolate=True and returns=\"remote\".")
    wanted = sandbox.wanted_layers()
    if "landlock" not in wanted:
        raise SandboxError(
            "replicas need the landlock layer: each replica's own Landlock domain keeps the others' memory, "
            "signals and files out of its reach. Keep landlock in Sandbox(layers=...).", layer="landlock")
    if sandbox.memory_limit is not None and "rlimits" in wanted and not memory_cgroup.probe()["available"]:
        raise SandboxError(
            f"replicas={replicas} needs a worker that may fork, and here it may not: there is no memory cgroup to "
            "hold memory_limit (not root, and no cgroup delegated to this user), so the worker is held to one "
            "address space (seccomp refuses fork; see SECURITY.md, Resource limits). Run where a memory cgroup "
            "can be had (as root, or with a delegated cgroup), or pass Sandbox(memory_limit=None) for a "
            "repository trusted with the machine's memory, or load the model N times (each a full copy).",
            layer="memory_cgroup")
    return replicas


def open_replicas(worker: Worker, model: str, count: int, applied: object) -> ReplicaSet:
    """Make the loaded ``worker`` the template of ``count`` replicas; the set owns it from here.

    ``applied``: the layers the worker reported in force (its RESULT's ``sandbox.applied``).
    Raises SandboxError (Landlock not in force, a fork refused) or what a channel reports.
    """
    if not isinstance(applied, list) or "landlock" not in applied:
        raise SandboxError(
            "replicas need Landlock in force in the worker (each replica enters a domain of its own) and this "
            "machine's kernel gave none; load without replicas (see `safehub doctor`).", layer="landlock")
    # The set bounds its time between calls and its whole life; its workers do not, each on its own.
    bounds = worker.sandbox
    worker.sandbox = dataclasses.replace(bounds, idle_timeout=None, lifetime=None)
    template = RemoteSession(worker, model)
    replicas: list[RemoteSession] = []
    try:
        for index in range(count):
            replicas.append(_fork_replica(template, index, worker.sandbox))
    except BaseException:
        for session in replicas:
            session.close()
        template.close()
        raise
    return ReplicaSet(template, replicas, bounds)


def _fork_replica(template: RemoteSession, index: int, sandbox: Sandbox) -> RemoteSession:
    """Ask the template for replica ``index``: its session."""
    worker = template.worker
    cgroup = None
    if worker.cgroup is not None and sandbox.memory_limit is not None:
        cgroup = memory_cgroup.MemoryCgroup.create(sandbox.memory_limit)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [theirs.fileno()]
    try:
        if cgroup is not None:
            fds.append(os.open(cgroup.procs, os.O_WRONLY | os.O_CLOEXEC))
        with template.call_lock:
            worker.restart_clock()
            frame = conversation.converse(worker, REPLICATE, {"index": index}, (), fds, asks={}, refuse_all=FETCH_REFUSED)
        pidfd = _replica_pidfd(frame, worker)
    except BaseException:
        ours.close()
        if cgroup is not None:
            cgroup.remove()
        raise
    finally:
        theirs.close()
        for fd in fds[1:]:
            os.close(fd)
    process = ReplicaProcess(pidfd, index)
    return RemoteSession(ReplicaChannel(sandbox, ours, process, cgroup), template.model)


def _replica_pidfd(frame: protocol.Frame, worker: Worker) -> int:
    """The REPLICATED's pidfd, checked to be a process of the worker's own tree."""
    if frame.kind == protocol.FAILED or "error" in frame.fields or len(frame.fds) != 1:
        frame.close_fds()
        why = frame.fields.get("error") or frame.fields.get("message") or "no pidfd"
        raise SandboxError(f"the worker could not fork a replica: {str(why)[:300]}", layer="replicas")
    pidfd = frame.fds[0]
    pid = pidfd_pid(pidfd)
    supervisor = worker.proc.pid if worker.proc is not None else None
    try:
        ours = pid is not None and supervisor in {p.pid for p in psutil.Process(pid).parents()}
    except psutil.Error:
        ours = False
    if not ours:
        os.close(pidfd)
        raise ProtocolError("the worker's answer to a REPLICATE names no process of its own tree")
    return pidfd


def pidfd_pid(pidfd: int) -> int | None:
    """The pid, in this process's pid namespace, of the process ``pidfd`` refers to (None: not a pidfd, or gone)."""
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    return None


class ReplicaProcess:
    """A replica's process, through a pidfd (it is the template's child, not ours): the interface of
    ``launch.WorkerProcess`` that a session needs."""

    def __init__(self, pidfd: int, index: int) -> None:
        self.pidfd = pidfd
        self.index = index
        self.pid = pidfd_pid(pidfd) or 0

    def running(self) -> bool:
        return self.pidfd >= 0 and not self._ended(0)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until it ended (its status is the template's to read); TimeoutExpired past ``timeout``."""
        if self.pidfd >= 0 and not self._ended(None if timeout is None else int(timeout * 1000)):
            raise subprocess.TimeoutExpired(f"replica {self.index}", timeout or 0)

    def _ended(self, timeout_ms: int | None) -> bool:
        poller = select.poll()  # a pidfd is readable once its process ended
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(timeout_ms))

    def kill(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ReplicaChannel(Worker):
    """One replica as a session sees a worker: its channel, its process, its memory cgroup."""

    def __init__(self, sandbox: Sandbox, sock: socket.socket, process: ReplicaProcess,
                 cgroup: memory_cgroup.MemoryCgroup | None) -> None:
        super().__init__(Path("/"), sandbox)
        self.sock = sock
        self.wire = protocol.Wire(sock)
        self.proc = process  # type: ignore[assignment]
        self.cgroup = cgroup
        self.deadline = time.monotonic() + sandbox.timeout

    def kill(self) -> None:
        """Kill the replica and, where it has a cgroup, every process it started."""
        if self.proc is not None:
            self.proc.kill()
        if self.cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(self.cgroup.procs).read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line), signal.SIGKILL)

    def finish(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=EXIT_GRACE_S)  # type: ignore[union-attr]

    def _cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
        process = self.proc
        assert isinstance(process, ReplicaProcess)
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=EXIT_GRACE_S)
        process.close()
        if self.cgroup is not None:
            self.cgroup.remove()

    def _hung_up(self, exc: Exception) -> WorkerError:
        process = self.proc
        assert isinstance(process, ReplicaProcess)
        grace = max(0.05, min(EXIT_GRACE_S, self.deadline - time.monotonic()))
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return ProtocolError(f"replica {process.index} closed its channel without answering ({exc})")
        if self.cgroup is not None and self.cgroup.oom_kills():
            return limit_error("memory_limit", self.sandbox, f"every page of replica {process.index} counted, the kernel "
                               "ended it before it answered", exit_code=None, signal_name="SIGKILL")
        return WorkerCrashedError(
            f"replica {process.index} (pid {process.pid}) died before answering; the model's other replicas go on",
            exit_code=None, signal_name=None)


class ReplicaSet:
    """The replicas of one remote model: each call to an idle one. Thread-safe; what a
    ``RemoteModule`` holds in place of a single session."""

    def __init__(self, template: RemoteSession, replicas: list[RemoteSession], sandbox: Sandbox) -> None:
        self.template = template
        self.model = template.model
        self.owner = template.owner  # the process the replicas belong to
        self.sandbox = sandbox
        self.live = list(replicas)
        self.idle = list(reversed(replicas))  # popped from the end: replica 0 first
        self.state = threading.Condition()
        self.gone: str | None = None
        self.busy = 0
        self.started = self.last_used = time.monotonic()
        if sandbox.idle_timeout is not None or sandbox.lifetime is not None:
            threading.Thread(target=self._watch, name="safehub-replicas-watchdog", daemon=True).start()

    @property
    def pid(self) -> int | None:
        """The worker's supervisor (the top of the tree every replica is in)."""
        return self.template.pid

    @property
    def replica_pids(self) -> tuple[int, ...]:
        """The pid of each replica still serving."""
        with self.state:
            return tuple(s.worker.proc.pid for s in self.live if s.worker.proc is not None)

    def warm_up(self) -> None:
        if self.live:
            self.live[0].warm_up()

    def call(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, inference: bool) -> Any:
        """``RemoteSession.call`` on an idle replica (waiting for one).

        A call whose result is the model itself (``eval()``, ``train()``, ``to(...)``, ``half()``:
        torch's way of saying the model changed), or to ``load_state_dict``, is then made on every
        other replica too, so they stay one model; any other state a call leaves is its replica's own.
        """
        session = self._take()
        try:
            value = session.call(method, args, kwargs, inference=inference)
        finally:
            self._give_back(session)
        if value is SELF or method in EVERY_REPLICA:
            for other in self._others(session):
                if self._take_this(other):
                    try:
                        other.call(method, args, kwargs, inference=inference)
                    finally:
                        self._give_back(other)
        return value

    def _others(self, session: RemoteSession) -> list[RemoteSession]:
        with self.state:
            return [s for s in self.live if s is not session]

    def _take_this(self, session: RemoteSession) -> bool:
        """Wait until this replica is idle and take it; False once it left the set."""
        with self.state:
            while session not in self.idle:
                if session not in self.live or self.gone is not None:
                    return False
                self.state.wait()
            self.idle.remove(session)
            self.busy += 1
            return True

    def _take(self) -> RemoteSession:
        with self.state:
            while True:
                if self.gone is not None:
                    raise RemoteClosedError(f"The remote model {self.model!r} is gone: {self.gone}. Load it again to go on.",
                                            reason=self.gone)
                while self.idle:
                    session = self.idle.pop()
                    if session.gone is None and session.worker.proc is not None and session.worker.proc.running():
                        self.busy += 1
                        return session
                    # It ended between calls (killed from outside, or by a limit): no call of the caller's fails for it.
                    session._end(f"replica {_index(session)} ended between calls")
                    self._drop(session)
                if not self.live:
                    self._mark_gone("every replica ended")
                    continue
                self.state.wait()

    def _give_back(self, session: RemoteSession) -> None:
        with self.state:
            self.busy -= 1
            self.last_used = time.monotonic()
            if session.gone is None:
                self.idle.append(session)
            else:
                self._drop(session)
                if not self.live:
                    self._mark_gone(f"every replica ended, the last because {session.gone}")
            self.state.notify_all()

    def _drop(self, session: RemoteSession) -> None:
        """Under ``state``: a replica that ended leaves the set (not replaced)."""
        if session in self.live:
            self.live.remove(session)
            _log.warning(f"a replica of the remote model {self.model!r} ended ({session.gone}); "
                         f"{len(self.live)} left")

    def _mark_gone(self, reason: str) -> None:
        if self.gone is None:
            self.gone = reason
        self.state.notify_all()

    def close(self) -> None:
        """End every replica, then the template. Idempotent."""
        with self.state:
            self._mark_gone("the handle was closed")
            sessions, self.live, self.idle = list(self.live), [], []
        for session in sessions:
            session.close()
        self.template.close()

    def _watch(self) -> None:
        """End the set once it sat idle, or lived, longer than the sandbox allows (as one worker would)."""
        with self.state:
            while self.gone is None:
                when, why = next_limit(self.sandbox, self.started, self.last_used, self.busy)
                now = time.monotonic()
                if when is not None and when <= now:
                    break
                self.state.wait(None if when is None else when - now)
            else:
                return
            self._mark_gone(why)
            sessions = list(self.live)
        for session in sessions:
            session._end(why)
        self.template._end(why)


def _index(session: RemoteSession) -> int:
    process = session.worker.proc
    return process.index if isinstance(process, ReplicaProcess) else 0
