"""The warm path, parent side: one zygote per process, started on first use, shared by threads.

The zygote (``worker/zygote.py``) is a child of this process that has imported torch
and the worker's code, and runs nothing else; for each isolated call it forks a fresh supervisor
and work process, which enter the same sandbox as a cold worker (DESIGN 6). This module starts
it (on the first warm call, or from :func:`warmup`), starts it again when it died or when the
allow-listed environment it was started with changed (torch and its thread pools read that at
import), hands it each call's descriptors, and wraps the supervisor in a :class:`WarmProcess`.

The zygote holds no secret: it starts with the workers' scrubbed environment, ``python -I -B``
and an empty private working folder, and a call's settings and environment travel in a memfd
that it passes on unread. It goes away with this process (it watches it through a pidfd, and
sees the control socket close), and so does every worker (each supervisor watches this process).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

from .. import _log, constants
from .._sandbox import Sandbox, worker_environ
from .._worker import ENTRY_SCRIPT
from .._worker import protocol
from .._worker.protocol import WorkerSettings
from . import reaper
from .memory_cgroup import MemoryCgroup

START_TIMEOUT_S = 120.0  # python -I plus import torch: about 1.5 s here, far more on a cold disk
SPAWN_TIMEOUT_S = 10.0
EXIT_REPORT_S = 2.0  # how long the zygote gets to report a supervisor's end once it is over
_LIMITS = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=1)
_LOG_TAIL = 2000


class Unavailable(Exception):
    """The warm path cannot take this call (the zygote is off, will not start, or failed it)."""


class WarmProcess:
    """A supervisor the zygote forked for one call, with the part of Popen's interface
    ``process.Worker`` uses: ``pid``, ``stdout``, ``stderr``, ``running``, ``wait``, ``kill``.

    It is the zygote's child, not ours: its end shows on a pidfd, and its wait status comes from
    the zygote (EXITED). ``wait`` returns Popen's returncode (negative: the signal), or None when
    the status was lost because the zygote died meanwhile.
    """

    def __init__(self, pid: int, pidfd: int, reply: socket.socket, stdout_fd: int, stderr_fd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.reply = reply
        self.stdout: IO[bytes] = open(stdout_fd, "rb")
        self.stderr: IO[bytes] = open(stderr_fd, "rb")
        self.returncode: int | None = None
        self.ended = False

    def running(self) -> bool:
        return not self.ended and not _readable(self.pidfd, 0)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the supervisor's end; raise ``subprocess.TimeoutExpired`` past ``timeout``."""
        if self.ended:
            return self.returncode
        if not _readable(self.pidfd, timeout):
            raise subprocess.TimeoutExpired(f"safehub supervisor {self.pid}", timeout or 0)
        try:
            frame = protocol.recv_frame(self.reply, deadline=time.monotonic() + EXIT_REPORT_S, limits=_LIMITS)
            status = frame.fields.get("status")
            if frame.kind != protocol.EXITED or type(status) is not int:
                raise ValueError(f"expected the supervisor's exit status, got a {frame.kind!r} frame")
            self.returncode = os.waitstatus_to_exitcode(status)
        except (protocol.FrameError, ValueError):
            self.returncode = None  # the zygote died with it, or broke the protocol
        self.ended = True
        self.reply.close()
        os.close(self.pidfd)
        return self.returncode

    def kill(self) -> None:
        if not self.ended:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


class Zygote:
    """One running zygote: its process, its control socket, and what its children can do."""

    def __init__(
        self, proc: subprocess.Popen[bytes], control: socket.socket, key: dict[str, str], namespaces: bool
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.control = control
        self.key = key  # the allow-listed environment it was started with
        self.namespaces = namespaces  # its children can unshare namespaces
        self.owner = os.getpid()
        self.send_lock = threading.Lock()
        self.spare_cgroup: MemoryCgroup | None = None  # the cgroup the zygote's spare worker enters

    def gone(self) -> None:
        """Once the zygote has exited (its spare with it): remove the spare's cgroup."""
        if self.spare_cgroup is not None and self.owner == os.getpid():
            self.spare_cgroup.remove()
            self.spare_cgroup = None

    @classmethod
    def start(cls, key: dict[str, str]) -> Zygote:
        home = tempfile.mkdtemp(prefix="safehub-zygote-")  # 0700, empty, removed once it is ready
        control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_path = os.path.join(home, "start.log")
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", ENTRY_SCRIPT, "--zygote",
                     "--control-fd", str(child.fileno()), "--parent-pid", str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=True,
                    pass_fds=(child.fileno(),),
                    start_new_session=True,  # the caller's Ctrl-C is the caller's, not the zygote's
                    env={**key, "HOME": home, "TMPDIR": home},
                    cwd=home,
                )
        except OSError as exc:
            control.close()
            shutil.rmtree(home, ignore_errors=True)
            raise Unavailable(f"could not start the zygote: {exc}") from exc
        finally:
            child.close()
        try:
            frame = protocol.recv_frame(control, deadline=time.monotonic() + START_TIMEOUT_S, limits=_LIMITS)
            frame.close_fds()
            namespaces = frame.fields.get("namespaces")
            if frame.kind != protocol.READY or frame.fields.get("pid") != proc.pid or type(namespaces) is not bool:
                raise protocol.FrameError(f"expected READY from pid {proc.pid}, got {frame.kind!r} {frame.fields!r}")
        except protocol.FrameError as exc:
            control.close()
            _stop(proc)
            message = f"the zygote did not start: {exc}; exit code {proc.returncode}; its output: {_tail(log_path)}"
            raise Unavailable(message) from None
        finally:
            shutil.rmtree(home, ignore_errors=True)
        return cls(proc, control, key, namespaces)

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def spawn(
        self, settings: WorkerSettings, environ: dict[str, str], channel_fd: int, memory_limit: int | None
    ) -> tuple[WarmProcess, MemoryCgroup | None]:
        """Have the zygote start a worker for one call on ``channel_fd`` (its spare, or one forked
        for it), in a memory cgroup of ``memory_limit`` bytes where one can be had; return it and
        that cgroup (the caller removes it). Raises Unavailable if the zygote will not, OSError if
        the cgroup's limit cannot be set."""
        with self.send_lock:  # the spare's cgroup goes to one call, in the order of the SPAWNs
            cgroup, self.spare_cgroup = self.spare_cgroup, None
            try:
                if cgroup is None:
                    cgroup = MemoryCgroup.create(memory_limit) if memory_limit else None
                elif memory_limit:
                    cgroup.set_limit(memory_limit)
                if cgroup is not None and memory_limit:
                    settings = settings.replace(memory_cgroup=str(cgroup.path))
                # The next spare's, made now: the zygote forks it as soon as this call is handed over.
                self.spare_cgroup = MemoryCgroup.create(None)
                return self._spawn(settings, environ, channel_fd), cgroup
            except BaseException:
                if cgroup is not None:
                    reaper.later(cleanup=cgroup.remove)  # the spare may still be in it
                raise

    def _spawn(self, settings: WorkerSettings, environ: dict[str, str], channel_fd: int) -> WarmProcess:
        ours: list[Any] = []  # closed if this fails
        theirs: list[Any] = []  # closed once the zygote has its copies
        try:
            reply, reply_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.append(reply)
            theirs.append(reply_child)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            ours += [out_r, err_r]
            theirs += [out_w, err_w]
            call_fd = _call_memfd(settings, environ)
            theirs.append(call_fd)
            by_name = {"reply": reply_child.fileno(), "channel": channel_fd, "stdout": out_w, "stderr": err_w,
                       "settings": call_fd}
            spare_cgroup = None if self.spare_cgroup is None else str(self.spare_cgroup.path)
            protocol.send_frame(
                self.control, protocol.SPAWN, {"spare_cgroup": spare_cgroup}, fds=[by_name[name] for name in protocol.SPAWN_FDS],
                deadline=time.monotonic() + SPAWN_TIMEOUT_S,
            )
            # Ours closed before waiting, so the pipes reach EOF when the worker's side is done.
            _close(theirs)
            frame = protocol.recv_frame(reply, deadline=time.monotonic() + SPAWN_TIMEOUT_S, limits=_LIMITS)
            pid = frame.fields.get("pid")
            if frame.kind != protocol.SPAWNED or type(pid) is not int or len(frame.fds) != 1:
                frame.close_fds()
                raise protocol.FrameError(str(frame.fields.get("error") or f"unexpected {frame.kind!r} frame"))
        except (protocol.FrameError, OSError) as exc:
            _close(ours + theirs)
            raise Unavailable(f"the zygote did not start the worker: {exc}") from None
        return WarmProcess(pid, frame.fds[0], reply, out_r, err_r)

    def close(self) -> None:
        """Let it go: it exits once its supervisors have ended (at once when idle)."""
        self.control.close()  # in a forked copy of the owner, only the copy's descriptor
        if self.owner == os.getpid():
            _retired.append(self)


def _call_memfd(settings: WorkerSettings, environ: dict[str, str]) -> int:
    data = json.dumps({"settings": json.loads(settings.to_json()), "environ": environ}).encode()
    fd = os.memfd_create("safehub-call", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


def _close(things: list[Any]) -> None:
    while things:
        thing = things.pop()
        with contextlib.suppress(OSError):
            thing.close() if isinstance(thing, socket.socket) else os.close(thing)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as log:
            return log.read()[-_LOG_TAIL:].decode("utf-8", "replace").strip() or "none"
    except OSError:
        return "none"


def _readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()


# -- the one zygote of this process ------------------------------------------------------------

_lock = threading.Lock()
_current: Zygote | None = None
_retired: list[Zygote] = []  # closed, not yet reaped
_failed: str | None = None  # why the zygote could not start: this process then stays cold
_inherited: list[Zygote] = []  # a forked parent's, left alone


def environ_key() -> dict[str, str]:
    """The allow-listed environment a zygote started now would get (HOME and TMPDIR aside)."""
    env = worker_environ(Sandbox(), "")
    del env["HOME"], env["TMPDIR"]
    return env


def warmup() -> bool:
    """Start the warm zygote now, rather than on the first isolated call.

    Isolated calls (``isolate=True`` or a :class:`Sandbox`) fork their worker from a zygote: a
    child of this process that has imported torch and safehub's worker code and runs nothing
    else. Each call's worker is still a fresh process in the full sandbox, but it starts in
    milliseconds instead of an interpreter start plus ``import torch``. The zygote starts by
    itself on the first isolated call, which then waits for it (a second or two); call this at
    start-up to pay that earlier, from a thread to overlap it with other work. It is shared by
    every thread, started again if it died, and ends with this process. ``SAFEHUB_WARM=0``
    switches it off.

    Returns:
        True when the zygote runs; False where isolated calls start cold instead (the warm path
        is switched off, or the zygote could not start here: a warning says why).

    Example::

        import safehub

        safehub.warmup()
        names = safehub.list("owner/repo", isolate=True)  # forked from the zygote
    """
    return acquire() is not None


def acquire() -> Zygote | None:
    """The shared zygote, started or restarted as needed; None where the warm path is off.

    Thread-safe: the first caller starts it (a second or two) while the others wait for it.
    """
    global _current, _failed
    if not constants.SAFEHUB_WARM:
        return None
    key = environ_key()
    with _lock:
        _reap_retired()
        zygote = _current
        if zygote is not None and (not zygote.alive() or zygote.key != key):
            zygote.close()
            _current = zygote = None
        if zygote is None and _failed is None:
            try:
                _current = zygote = Zygote.start(key)
            except Unavailable as exc:
                _failed = str(exc)
                _log.warning(f"isolated calls start cold in this process: {exc}")
        return zygote


def discard(zygote: Zygote) -> None:
    """Retire a zygote that failed a call; the next call starts a new one."""
    global _current
    with _lock:
        if _current is zygote:
            _current = None
            zygote.close()


def current_pid() -> int | None:
    """The running zygote's pid, or None (for tests and benchmarks)."""
    zygote = _current
    return zygote.pid if zygote is not None and zygote.alive() else None


def _reap_retired() -> None:
    for zygote in _retired:
        if zygote.proc.poll() is not None:
            zygote.gone()
    _retired[:] = [z for z in _retired if z.proc.returncode is None]


@atexit.register
def stop() -> None:
    """Stop the zygote now and wait for it (at exit; tests). The next warm call starts a new one.

    Calls in flight keep their workers; a status the zygote has not reported within
    ``EXIT_REPORT_S`` is lost with it.
    """
    global _current
    reaper.drain()  # the calls that returned: their processes gone, their folders removed
    with _lock:
        if _current is not None:
            _current.close()
            _current = None
        for zygote in _retired:
            try:
                zygote.proc.wait(timeout=EXIT_REPORT_S)  # idle, it exits as soon as its socket closes
            except subprocess.TimeoutExpired:
                _stop(zygote.proc)
            zygote.gone()
        _retired.clear()


def _forget_after_fork() -> None:
    # A forked child must not share its parent's zygote: the supervisors watch the parent, and
    # two processes writing one control socket would mix their frames.
    global _current, _lock, _retired
    if _current is not None:
        _current.close()
    # Never collected: their Popen objects would warn here about children that are not ours.
    _inherited.extend(([_current] if _current is not None else []) + _retired)
    _current, _lock, _retired = None, threading.Lock(), []


os.register_at_fork(after_in_child=_forget_after_fork)
