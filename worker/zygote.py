"""The warm path's zygote: torch imported once, then a fresh, sandboxed worker forked per call.

Started through the entry script::

    python -I -B main.py --zygote --control-fd FD --parent-pid PID

argv
    --control-fd   an inherited AF_UNIX stream socket: the only channel to the parent
                   (``safehub/_run/warm.py``)
    --parent-pid   the parent's pid; the zygote exits when it dies

Environment, working folder, stdio
    The workers' allow-listed environment, an empty private folder, /dev/null for stdin; stdout
    and stderr go to a start-up log until READY, then to /dev/null. The zygote holds no secret,
    and nothing of a call ever enters its memory (every later worker is forked from it): a
    call's settings and environment come in a memfd that only the call's own supervisor reads.

What it holds
    torch, cloudpickle and the worker's own modules, imported (``work.preload``). It runs no
    torch op (libgomp hangs a forked child after a parallel op) and no repository code.

Input and output (``protocol.py``: READY, SPAWN, SPAWNED, EXITED)
    READY once the imports are done; then, for each SPAWN on the control socket, SPAWNED with a
    pidfd of the new supervisor on the call's reply socket, and EXITED with its wait status once
    the zygote has reaped it.

Processes
    Each supervisor sets itself up the way a cold one is started (its own session, stdout and
    stderr on the call's pipes, the call's scratch folder as working folder, the call's
    environment), then runs ``supervisor.supervise``, like a cold worker's P1: it watches the caller
    (not the zygote) through the zygote's pidfd of it, forks the work process, which applies the
    same sandbox (``confine.apply_sandbox``), kills whatever is left, and mirrors its end.

Exit status
    0 when the control socket closes (after every supervisor ended and was reported) or the
    parent dies (at once: each supervisor watches the parent itself); 64 bad command line; 70 a
    failure while starting (see the start-up log); 71 the parent was already gone.
"""

from __future__ import annotations

import gc
import json
import os
import select
import socket
import sys
import time
from typing import Any, NoReturn

from . import protocol, supervisor, work
from .protocol import EXIT_OK, EXIT_SOFTWARE, EXIT_SUPERVISOR, EXIT_USAGE, WorkerSettings
from .sandbox import probe
from .sandbox.libc import libc

_ARGS = ("--control-fd", "--parent-pid")
_SEND_TIMEOUT_S = 5.0  # the parent reads every frame at once; a stuck one is given up, not waited on
_MAX_CALL_BYTES = 64 * 1024 * 1024


def main(argv: list[str]) -> NoReturn:
    """Run the zygote: ``--control-fd FD --parent-pid PID``."""
    try:
        opts = dict(zip(argv[::2], argv[1::2], strict=False))  # an odd count is refused below
        if len(argv) != 2 * len(_ARGS) or sorted(opts) != sorted(_ARGS):
            raise ValueError(f"expected {' '.join(a + ' VALUE' for a in _ARGS)}")
        control_fd, parent_pid = int(opts["--control-fd"]), int(opts["--parent-pid"])
    except ValueError as exc:
        print(f"safehub zygote: bad command line: {exc}", file=sys.stderr)
        os._exit(EXIT_USAGE)
    try:
        # A pidfd, not a parent-death signal: that fires when the *thread* that started the
        # zygote ends, and a caller may start it from any short-lived thread.
        parent_fd = os.pidfd_open(parent_pid)
        if os.getppid() != parent_pid:
            os._exit(EXIT_SUPERVISOR)  # the parent died before the watch took hold
        zygote = _Zygote(control_fd, parent_fd)
        zygote.serve()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(EXIT_SOFTWARE)
    # _exit: tearing down an interpreter that imported torch costs tenths of a second for nothing.
    os._exit(EXIT_OK)


class _Zygote:
    """The control loop: fork a supervisor per SPAWN, reap it, report its end."""

    def __init__(self, control_fd: int, parent_fd: int) -> None:
        work.preload()
        self.control = socket.socket(fileno=control_fd)
        self.parent_fd = parent_fd
        self.calls: dict[int, tuple[int, socket.socket]] = {}  # supervisor pidfd -> (pid, reply socket)
        spawn_fds = len(protocol.SPAWN_FDS)
        self.limits = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=spawn_fds)

    def serve(self) -> None:
        namespaces = self._namespaces_work()
        # Objects made so far are never collected here or in a child: a collection in a child
        # would otherwise touch (and copy) every page of them.
        gc.freeze()
        _huge_pages()
        self._send(self.control, protocol.READY, {"pid": os.getpid(), "namespaces": namespaces})
        # Nothing printed during the imports may sit in a buffer that a worker would then flush.
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        accepting = True
        while accepting or self.calls:
            poller = select.poll()
            poller.register(self.parent_fd, select.POLLIN)
            if accepting:
                poller.register(self.control, select.POLLIN)
            for pidfd in self.calls:
                poller.register(pidfd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self.parent_fd in ready:
                return  # each supervisor saw it too, and takes its own tree down
            for pidfd in ready & set(self.calls):
                self._reap(pidfd)
            if accepting and self.control.fileno() in ready:
                accepting = self._accept()

    def _namespaces_work(self) -> bool:
        """Whether a forked child can unshare its namespaces here (tried in a throwaway child)."""
        return bool(probe.probe(("namespaces",))["namespaces"]["available"])

    def _accept(self) -> bool:
        """Serve one SPAWN; False once the parent closed the control socket (or broke the protocol)."""
        try:
            frame = protocol.recv_frame(self.control, deadline=time.monotonic() + _SEND_TIMEOUT_S, limits=self.limits)
        except protocol.FrameError:
            return False
        if frame.kind != protocol.SPAWN or len(frame.fds) != len(protocol.SPAWN_FDS):
            frame.close_fds()
            return False
        reply_fd, *call_fds = frame.fds
        reply = socket.socket(fileno=reply_fd)
        try:
            pid = os.fork()
        except OSError as exc:
            self._send(reply, protocol.SPAWNED, {"error": f"fork failed: {exc}"})
            reply.close()
            pid = -1
        if pid == 0:
            self._become_supervisor(reply, *call_fds)
        for fd in call_fds:
            os.close(fd)  # the supervisor has them; a copy here would keep the call's pipes open
        if pid > 0:
            # Opened while the child is unreaped, so the pid cannot have been reused yet.
            pidfd = os.pidfd_open(pid)
            self.calls[pidfd] = (pid, reply)
            self._send(reply, protocol.SPAWNED, {"pid": pid}, fds=(pidfd,))
        return True

    def _reap(self, pidfd: int) -> None:
        pid, reply = self.calls.pop(pidfd)
        _, status = os.waitpid(pid, 0)  # its pidfd is readable: it has exited, this does not block
        os.close(pidfd)
        self._send(reply, protocol.EXITED, {"status": status})
        reply.close()

    def _send(self, sock: socket.socket, kind: str, fields: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        try:
            protocol.send_frame(sock, kind, fields, fds=fds, deadline=time.monotonic() + _SEND_TIMEOUT_S)
        except (protocol.FrameError, OSError):
            pass  # the caller gave up on this call; its supervisor still watches the caller

    def _become_supervisor(
        self, reply: socket.socket, channel_fd: int, stdout_fd: int, stderr_fd: int, call_fd: int
    ) -> NoReturn:
        """In the forked child: take the call's session, stdio, folder and environment, then supervise."""
        try:
            # The zygote's sockets are not the supervisor's: detached, so that no socket object
            # closes a descriptor number the work process reuses; supervise() closes them all.
            for sock in [self.control, reply] + [r for _, r in self.calls.values()]:
                sock.detach()
            os.setsid()  # no controlling terminal, no signals from the caller's process group
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            call = json.loads(_read_all(call_fd))
            settings, environ = WorkerSettings.from_dict(call["settings"]), call["environ"]
            os.chdir(settings.scratch_dir)
            os.environ.clear()
            os.environ.update(environ)
            _fresh_process_state()
        except BaseException as exc:
            try:
                os.write(2, f"safehub worker: the supervisor could not take the call: {exc}\n".encode())
            finally:
                os._exit(EXIT_SUPERVISOR)
        supervisor.supervise(channel_fd, self.parent_fd, settings)


def _read_all(fd: int) -> bytes:
    data = bytearray()
    while len(data) <= _MAX_CALL_BYTES:
        chunk = os.pread(fd, 1024 * 1024, len(data))  # pread: the parent's writes moved the offset
        if not chunk:
            return bytes(data)
        data += chunk
    raise ValueError("the call's settings are too large")


def _huge_pages() -> None:
    """Back the heap with 2 MiB pages where the kernel can (MADV_COLLAPSE, Linux 6.1), best effort.

    A fork copies, and each exit frees, one page-table entry per 4 KiB page of the zygote's
    ~150 MB of heap: with huge pages a fork and an exit cost about half as much, per process of
    the three a call starts. A child's write still copies only the 4 KiB it touches.
    """
    import ctypes

    try:
        lib = libc()
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return
    for line in lines:
        fields = line.split()
        # Private, writable, anonymous memory: the malloc heap and mmap'd arenas.
        if len(fields) < 5 or fields[1][1:4] != "w-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start, end = (start + _HUGE - 1) & ~(_HUGE - 1), end & ~(_HUGE - 1)
        if end > start:
            lib.madvise(start, end - start, _MADV_COLLAPSE)  # refused (old kernel, no THP): no harm


_HUGE = 2 * 1024 * 1024
_MADV_COLLAPSE = 25


def _fresh_process_state() -> None:
    """Give what a fresh interpreter seeds at start a seed of its own (random reseeds at fork)."""
    random = sys.modules.get("numpy.random")  # seeded once, here, if anything imported it
    if random is not None:
        random.seed()
