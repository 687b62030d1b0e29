"""One worker process's life in the parent: start, channel, output relay, whole-tree kill, scratch.

:class:`Worker` is a context manager: on enter it makes the call's scratch folder and starts the
worker (``launch.py``: forked by the zygote or a fresh interpreter); on exit, whatever happened,
every process of the worker's tree is killed, the relays drained and the scratch folder removed.
Its channel is where the protocol's own errors (``FrameError`` and kin) become safehub errors:
a timeout, a crash (with the signal's name), a broken protocol.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from .._sandbox import Sandbox, worker_environ
from .._worker import protocol
from .._limit_errors import SIGNAL_LIMITS, limit_error
from ..errors import ProtocolError, WorkerCrashedError, WorkerError, WorkerTimeoutError
from . import launch, memory_cgroup, reaper
from .output import Relay
from .._stale import remove_tree
from .replies import result_cap
from .scratch import make_scratch

EXIT_GRACE_S = 2.0  # how long a worker that answered (or hung up) gets to exit by itself


class Worker:
    """One worker process: started on enter; on exit killed with its whole tree, scratch removed."""

    def __init__(self, repo_dir: Path, sandbox: Sandbox, view_dir: Path | None = None) -> None:
        self.repo_dir = repo_dir
        self.sandbox = sandbox
        self.view_dir = view_dir
        self.proc: launch.WorkerProcess | None = None
        self.sock: socket.socket | None = None
        self.wire: protocol.Wire | None = None
        self.capped: dict[int, tuple[protocol.Limits, protocol.Limits]] = {}  # limits held to result_cap, per exchange
        self.relays: list[Relay] = []
        self.scratch_dir: Path | None = None
        self.cgroup: memory_cgroup.MemoryCgroup | None = None
        self.deadline = 0.0

    def __enter__(self) -> Worker:
        try:
            self._start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup()

    def _start(self) -> None:
        reaper.settle()  # no process of a call that returned is left when this one starts
        drop = os.geteuid() == 0 and "uid_drop" in self.sandbox.wanted_layers()
        try:
            self.scratch_dir = make_scratch(for_dropped_uid=drop)
            view = None if self.view_dir is None else str(self.view_dir)
            settings = self.sandbox.worker_settings(str(self.repo_dir), str(self.scratch_dir)).replace(view_dir=view)
            limit = self.sandbox.memory_limit
            # One bound for the whole sandbox where a cgroup can be had (launch.py); else memory_shares.
            limit = limit if limit is not None and "rlimits" in self.sandbox.wanted_layers() else None
            environ = worker_environ(self.sandbox, str(self.scratch_dir), torch_home=view)
            self.proc, self.sock, self.cgroup = launch.start_worker(settings, environ, self.scratch_dir, limit)
            self.wire = protocol.Wire(self.sock, spin=protocol.SPIN_S)  # every frame of the worker's channel, both ways
        except OSError as exc:
            raise WorkerError(f"could not start the worker: {exc}") from exc
        self.deadline = time.monotonic() + self.sandbox.timeout
        self.relays = [Relay(self.proc.stdout, sys.stdout), Relay(self.proc.stderr, sys.stderr)]
        for relay in self.relays:
            relay.start()

    def send(self, kind: str, fields: dict[str, Any], buffers: Sequence[bytes] = (), fds: Sequence[int] = ()) -> None:
        assert self.wire is not None
        try:
            self.wire.send(kind, fields, buffers, fds, deadline=self.deadline)
        except protocol.FrameError as exc:
            raise self._protocol_error(exc) from None

    def receive(self, expected: tuple[str, ...], limits: protocol.Limits) -> protocol.Frame:
        """The worker's next frame, held to its declaration (``protocol.MESSAGES``) and to ``limits``."""
        assert self.wire is not None
        entry = self.capped.get(id(limits))  # by identity: the exchanges' limits are module constants
        if entry is None or entry[0] is not limits:
            cap = result_cap(self.sandbox)
            held = limits
            if cap < limits.max_total_bytes:  # no inline reply larger than the worker could hold
                held = dataclasses.replace(limits, max_buffer_bytes=min(limits.max_buffer_bytes, cap), max_total_bytes=cap)
            entry = self.capped[id(limits)] = (limits, held)
        capped = entry[1]
        try:
            frame = self.wire.receive(deadline=self.deadline, limits=capped)
            try:
                return protocol.check_message(frame, expected)
            except protocol.FrameError:
                frame.close_fds()
                raise
        except protocol.FrameError as exc:
            raise self._protocol_error(exc) from None

    def unread_bytes(self) -> int:
        """Bytes sent to the worker that it has not read yet: the kernel's count (``SIOCOUTQ``)."""
        assert self.sock is not None
        count = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, count, True)  # SIOCOUTQ == TIOCOUTQ on Linux
        return count[0]

    def _protocol_error(self, exc: protocol.FrameError) -> Exception:
        """The one place protocol errors become safehub errors."""
        if isinstance(exc, protocol.FrameTimeout):
            return WorkerTimeoutError(
                f"the worker ran past its time limit of {self.sandbox.timeout:g} s and was killed; "
                "raise it with Sandbox(timeout=...)",
                timeout=self.sandbox.timeout,
            )
        if isinstance(exc, protocol.FrameEOF):
            return self._hung_up(exc)
        return ProtocolError(f"the worker's reply breaks the protocol: {exc}")

    def _hung_up(self, exc: Exception) -> WorkerError:
        """The channel closed: name how the worker ended, if it ends within the grace period."""
        assert self.proc is not None
        grace = max(0.05, min(EXIT_GRACE_S, self.deadline - time.monotonic()))
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return ProtocolError(f"the worker closed the channel without answering ({exc})")
        if self.cgroup is not None and self.cgroup.oom_kills():
            # The kernel's OOM killer in the worker's own cgroup: the sandbox's limit, not a crash.
            return limit_error("memory_limit", self.sandbox,
                               "every process, memfd and tmpfs file of the sandbox counted, the kernel ended "
                               "it before it answered", exit_code=code, signal_name="SIGKILL")
        if code is None:
            message = "the worker ended before answering; the zygote that forked it did not report its exit status"
            return WorkerCrashedError(message, exit_code=None, signal_name=None)
        if code == protocol.EXIT_MEMORY:
            return limit_error("memory_limit", self.sandbox, "the worker ran out of memory while it started, before "
                               "the repository's code ran", exit_code=code)
        crashed = crashed_error(code)
        setting = SIGNAL_LIMITS.get(crashed.signal_name or "")
        if setting:  # only a limit sends this signal: say which, not "crashed"
            return limit_error(setting, self.sandbox, f"the worker was killed by {crashed.signal_name}",
                               exit_code=crashed.exit_code, signal_name=crashed.signal_name)
        return crashed

    def restart_clock(self, seconds: float | None = None) -> None:
        """A worker that stays up (a remote model) starts a call: its time limit counts from now."""
        self.deadline = time.monotonic() + (self.sandbox.timeout if seconds is None else seconds)

    def finish(self) -> None:
        """After an answer: let the worker exit by itself (its supervisor reaps the tree)."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=EXIT_GRACE_S)

    def release(self) -> None:
        """After the final answer of a call: show what the worker wrote before it, and leave its
        end (exit, reaping, folders) to the background (``reaper.py``); the next call waits for
        its processes to be gone."""
        for relay in self.relays:
            relay.settle(timeout=EXIT_GRACE_S)
        if self.sock is not None:
            self.sock.close()  # the answer is in: nothing more is read or sent
        proc, relays, cgroup, scratch_dir = self.proc, self.relays, self.cgroup, self.scratch_dir
        self.proc, self.sock, self.relays, self.cgroup, self.scratch_dir = None, None, [], None, None

        def end() -> None:
            if proc is not None:
                try:
                    proc.wait(timeout=EXIT_GRACE_S)
                except subprocess.TimeoutExpired:
                    if proc.running():
                        kill_process_tree(proc.pid)
                        with contextlib.suppress(OSError):
                            proc.kill()
                    proc.wait()

        def cleanup() -> None:
            for relay in relays:
                relay.join(timeout=EXIT_GRACE_S)
            if cgroup is not None:
                cgroup.remove()
            if scratch_dir is not None:
                remove_tree(scratch_dir)

        reaper.later(end=end, cleanup=cleanup)

    def kill(self) -> None:
        """Kill the worker's whole tree now; a thread blocked on its channel then sees it close."""
        if self.proc is not None and self.proc.running():  # only a live (unreaped) pid is ours to kill
            kill_process_tree(self.proc.pid)
            with contextlib.suppress(OSError):
                self.proc.kill()

    def _cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            if self.proc.running():
                # Its descendants first: the supervisor, their subreaper, reaps them and exits.
                kill_process_tree(self.proc.pid, include_root=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=EXIT_GRACE_S)
            self.kill()
            self.proc.wait()
        for relay in self.relays:
            relay.join(timeout=EXIT_GRACE_S)
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch_dir is not None:
            remove_tree(self.scratch_dir)


def crashed_error(returncode: int) -> WorkerCrashedError:
    """WorkerCrashedError for a Popen returncode (negative: killed by that signal)."""
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = " (out of memory, or killed from outside)" if name == "SIGKILL" else ""
        message = f"the worker died of {name}({returncode}){hint} before answering"
        return WorkerCrashedError(message, exit_code=returncode, signal_name=name)
    meaning = protocol.EXIT_MEANINGS.get(returncode)
    message = f"the worker exited with code {returncode} before answering"
    return WorkerCrashedError(f"{message}: {meaning}" if meaning else message, exit_code=returncode, signal_name=None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_process_tree(pid: int, *, include_root: bool = True) -> None:
    """Stop then kill every descendant of ``pid`` until none is left, then ``pid`` itself."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for _ in range(500):
        try:
            alive = [p for p in root.children(recursive=True) if _is_alive(p)]
        except psutil.NoSuchProcess:
            break
        if not alive:
            break
        for action in ("suspend", "kill"):  # stopped first, so none forks while we go round
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    getattr(proc, action)()
        time.sleep(0.01)
    if include_root:
        with contextlib.suppress(psutil.Error):
            root.kill()


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
