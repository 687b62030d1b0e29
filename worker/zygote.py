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

Input and output (``protocol.py``: READY, SPAWN, SPAWNED, EXITED; TAKE, TAKEN)
    READY once the imports are done; then, for each SPAWN on the control socket, SPAWNED with a
    pidfd of the call's supervisor on the call's reply socket, and EXITED with its wait status once
    the zygote has reaped it.

Processes
    Each call's worker is a supervisor forked from the zygote, set up the way a cold one is
    started (its own session, stdout and stderr on the call's pipes, the call's scratch folder as
    working folder, the call's environment), which runs ``supervisor.supervise`` like a cold
    worker's: it watches the caller (not the zygote) through the zygote's pidfd of it, enters the
    call's cgroup and namespaces, forks the work process (under a small init in a pid namespace),
    which applies the rest of the sandbox, and leaves nothing behind when it ends.

    One such worker is kept ready (a spare, ``spare.py``): forked after a call for that call's
    shape, cgroup entered and namespaces made, its work process waiting for the next call, which
    the zygote hands it with TAKE. A spare that died is replaced (not after three in a row); one
    that cannot take a call (another shape) exits, and the call gets a worker forked for it. When
    the control socket closes the spare is let go, and waited for, before the zygote exits.

Exit status
    0 when the control socket closes (after every supervisor ended and was reported) or the
    parent dies (at once: each supervisor watches the parent itself); 64 bad command line; 70 a
    failure while starting (see the start-up log); 71 the parent was already gone.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time
from typing import Any, NoReturn

from . import protocol, spare, work
from .protocol import EXIT_OK, EXIT_SOFTWARE, EXIT_SUPERVISOR, EXIT_USAGE
from .sandbox import confine, probe
from .sandbox.libc import libc

_ARGS = ("--control-fd", "--parent-pid")
_SEND_TIMEOUT_S = 5.0  # the parent reads every frame at once; a stuck one is given up, not waited on


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


class _Worker:
    """A supervisor the zygote forked, with the socket its work process reports on (TAKEN)."""

    def __init__(self, pid: int, post: socket.socket) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # opened while the child is unreaped: the pid is still its own
        self.post = post


class _Handoff:
    """A call handed to a worker whose TAKEN is awaited (a spare's, or a fresh worker's shape)."""

    def __init__(self, worker: _Worker, reply: socket.socket | None, call_fds: list[int]) -> None:
        self.worker = worker
        self.reply = reply  # None: the call is announced already (a fresh worker)
        self.call_fds = call_fds  # the zygote's copies, kept for a fresh worker if the spare fails


class _Zygote:
    """The control loop: hand each SPAWN to the spare (or fork a worker for it), keep a spare
    ready, reap every worker, report each call's end."""

    def __init__(self, control_fd: int, parent_fd: int) -> None:
        work.preload()
        self.control = socket.socket(fileno=control_fd)
        self.parent_fd = parent_fd
        self.calls: dict[int, tuple[int, socket.socket]] = {}  # supervisor pidfd -> (pid, reply socket)
        self.handoffs: dict[int, _Handoff] = {}  # by its worker's post socket
        self.spare: _Worker | None = None
        self.retired: dict[int, int] = {}  # pidfd -> pid of workers let go, reaped when they end
        self.shape: dict[str, Any] | None = None  # the last call's (TAKEN): the next spare's
        self.spare_cgroup: str | None = None  # the parent's memory cgroup for the next spare
        self.spare_deaths = 0  # spares in a row that died before taking a call
        spawn_fds = len(protocol.SPAWN_FDS)
        self.limits = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=spawn_fds)
        self.taken_limits = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=0)

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
        while accepting or self.calls or self.handoffs or self.retired:
            poller = select.poll()
            poller.register(self.parent_fd, select.POLLIN)
            if accepting:
                poller.register(self.control, select.POLLIN)
            for fd in [*self.calls, *self.handoffs, *self.retired] + ([self.spare.pidfd] if self.spare else []):
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self.parent_fd in ready:
                return  # each supervisor saw it too, and takes its own tree down
            for pidfd in ready & set(self.calls):
                self._reap(pidfd)
            for pidfd in ready & set(self.retired):
                os.waitpid(self.retired.pop(pidfd), 0)
                os.close(pidfd)
            for fd in ready & set(self.handoffs):
                self._taken(self.handoffs.pop(fd))
            if self.spare is not None and self.spare.pidfd in ready:
                self.spare_deaths += 1
                self._retire(self.spare)
                self.spare = None
            if accepting and self.control.fileno() in ready:
                accepting = self._accept()
                if not accepting:
                    self._let_spare_go()
            if accepting:
                self._keep_spare()
        self._let_spare_go()

    def _namespaces_work(self) -> bool:
        """Whether a forked child can unshare its namespaces here (tried in a throwaway child)."""
        return bool(probe.probe(("namespaces",))["namespaces"]["available"])

    def _accept(self) -> bool:
        """Serve one SPAWN; False once the parent closed the control socket (or broke the protocol)."""
        try:
            frame = protocol.recv_frame(self.control, deadline=time.monotonic() + _SEND_TIMEOUT_S, limits=self.limits)
        except protocol.FrameError:
            return False
        try:
            protocol.check_message(frame, (protocol.SPAWN,))
        except protocol.FrameError:
            frame.close_fds()
            return False
        if len(frame.fds) != len(protocol.SPAWN_FDS):
            frame.close_fds()
            return False
        reply_fd, *call_fds = frame.fds
        reply = socket.socket(fileno=reply_fd)
        self.spare_cgroup = frame.fields.get("spare_cgroup")
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                protocol.send_frame(spare.post, protocol.TAKE, {}, fds=call_fds, deadline=time.monotonic() + _SEND_TIMEOUT_S)
            except (protocol.FrameError, OSError):
                self._retire(spare)
                spare = None
        if spare is not None:
            self.handoffs[spare.post.fileno()] = _Handoff(spare, reply, call_fds)
        else:
            self._start_fresh(reply, call_fds)
        return True

    def _start_fresh(self, reply: socket.socket, call_fds: list[int]) -> None:
        """Fork a worker for this call, with the call's descriptors, and announce it."""
        worker = self._fork(call_fds=call_fds)
        for fd in call_fds:
            os.close(fd)  # the supervisor has them; a copy here would keep the call's pipes open
        if worker is None:
            self._send(reply, protocol.SPAWNED, {"error": "the zygote could not fork a worker"})
            reply.close()
            return
        self._announce(worker, reply)
        self.handoffs[worker.post.fileno()] = _Handoff(worker, None, [])  # for its shape

    def _taken(self, handoff: _Handoff) -> None:
        """A worker's TAKEN (or its end before it said anything)."""
        worker = handoff.worker
        try:
            frame = protocol.check_message(
                protocol.recv_frame(worker.post, deadline=time.monotonic() + _SEND_TIMEOUT_S, limits=self.taken_limits),
                (protocol.TAKEN,))
            self.shape, taken = frame.fields["shape"], frame.fields["taken"]
        except protocol.FrameError:
            taken = False  # it died first
        worker.post.close()
        if handoff.reply is None:
            return  # a fresh worker's shape
        # Taken, the spare holds the call's channel even if its supervisor was killed meanwhile: a
        # second worker on that channel would race it for the CALL (and wait out the timeout when
        # the dying one read it). So the spare stays the call's worker, and its end the call's.
        if taken:
            self.spare_deaths = 0
            for fd in handoff.call_fds:
                os.close(fd)
            self._announce(worker, handoff.reply)
            return
        # The spare died, or was prepared for another shape and exits: a worker of the call's own.
        self._retire(worker)
        self._start_fresh(handoff.reply, handoff.call_fds)

    def _announce(self, worker: _Worker, reply: socket.socket) -> None:
        self.calls[worker.pidfd] = (worker.pid, reply)
        self._send(reply, protocol.SPAWNED, {"pid": worker.pid}, fds=(worker.pidfd,))

    def _keep_spare(self) -> None:
        # Forked once no call runs: not at the expense of the call it follows (two cores here), and
        # no worker ever runs beside an idle spare, which the next call's settings will reach.
        if self.spare is None and self.shape is not None and self.spare_deaths < 3 and not self.handoffs and not self.calls:
            try:
                shape = spare.shape_from(self.shape, self.spare_cgroup)
            except ValueError:
                self.shape = None
                return
            self.spare = self._fork(shape=shape)

    def _retire(self, worker: _Worker) -> None:
        """Let a worker go: its post socket closed (a waiting spare exits), reaped once it ends."""
        worker.post.close()
        self.retired[worker.pidfd] = worker.pid

    def _let_spare_go(self) -> None:
        """No more calls: the spare ends, and is waited for (its processes are gone after)."""
        if self.spare is None:
            return
        worker, self.spare = self.spare, None
        worker.post.close()
        poller = select.poll()
        poller.register(worker.pidfd, select.POLLIN)
        if not poller.poll(int(_SEND_TIMEOUT_S * 1000)):
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        os.waitpid(worker.pid, 0)
        os.close(worker.pidfd)

    def _fork(self, *, shape: confine.Shape | None = None, call_fds: list[int] | None = None) -> _Worker | None:
        """Fork a supervisor: for a call (``call_fds``) or a spare of ``shape``; None if fork fails."""
        post, child_post = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            post.close()
            child_post.close()
            return None
        if pid == 0:
            self._become_worker(child_post, shape, call_fds, post)
        child_post.close()
        return _Worker(pid, post)

    def _become_worker(
        self, child_post: socket.socket, shape: confine.Shape | None, call_fds: list[int] | None, post: socket.socket
    ) -> NoReturn:
        """In the forked child: the zygote's sockets are not the worker's. Detached, so that no
        socket object closes a descriptor number the work process reuses (supervise() closes them)."""
        try:
            others = [self.control, post] + [r for _, r in self.calls.values()]
            others += [h.worker.post for h in self.handoffs.values()] + [h.reply for h in self.handoffs.values() if h.reply]
            others += [self.spare.post] if self.spare is not None else []
            for sock in others:
                sock.detach()
            post_fd = child_post.detach()
        except BaseException:
            os._exit(EXIT_SUPERVISOR)
        if call_fds is not None:
            spare.fresh(post_fd, self.parent_fd, *call_fds)
        assert shape is not None
        spare.spare(post_fd, self.parent_fd, shape)

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
