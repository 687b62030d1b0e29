"""Replicas of a remote model (``replicas=N``): forks of the loaded work process, each its own sandbox.

After a ``returns="remote"`` load, a parent that wants replicas sends REPLICATE instead of a first
INVOKE. The work process then becomes the *template*: it serves no call itself, so nothing of any
call is ever in its memory, and for each REPLICATE it forks one replica and answers REPLICATED with
a pidfd of it (``{"error"}`` where the fork is refused: without a memory cgroup seccomp holds the
worker to one address space). A replica shares the template's pages copy-on-write (the weights
stay one copy until a replica writes them) and serves the calls of its own channel with
``remote.serve``, one at a time, until CLOSE or EOF.

Each replica, before it serves (the forking thread is the only one a fork keeps; the model's
threads stay behind in the template):

- dies with the template (a parent-death signal), and reaps its own children (SIGCHLD default);
- starts a session of its own, so that where the scheduler shares CPU between sessions
  (``sched_autogroup``) each replica gets a worker's share, not a slice of one;
- enters its own memory cgroup where the parent made one: it writes ``0`` (itself) into that
  cgroup's ``cgroup.procs``, opened by the parent and handed over with the REPLICATE, since
  Landlock keeps the worker from opening it;
- closes every descriptor but stdio and its channel (the template's channel, and anything the
  repository opened during the load: a pipe or memfd shared by all replicas would join them);
- turns every shared mapping it could write into a private copy (``MAP_SHARED`` memory the load
  made would be one writable page set for all replicas);
- enters a Landlock domain of its own, nested in the worker's: it may write only its own folder
  ``<scratch>/replicas/<index>`` (its HOME, TMPDIR and working folder), read what the worker
  reads plus the template's scratch (the repository's view) but no other replica's folder, and
  cannot ptrace, read the memory of, or (ABI 6) signal another replica;
- runs torch with one intra-op thread: libgomp cannot start its pool again in a fork of a
  process that used it (the first parallel op hangs), and N replicas are for N cores anyway.

Seccomp, rlimits (each replica its own RLIMIT_AS and RLIMIT_CPU count) and the namespaces are
inherited from the worker unchanged. Worker code that keeps shared memory of its own across calls
(a pool of result segments the parent maps) must not carry it into a replica: the replica would
write a private copy the parent never sees. Make it per process (``os.register_at_fork``'s
``after_in_child`` to drop it) or lazily after the fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, NoReturn

from . import grants, protocol
from .protocol import EXIT_OK, EXIT_SOFTWARE, WorkerSettings
from .sandbox import landlock
from .sandbox.confine import close_other_fds
from .sandbox.libc import libc, prctl

PR_SET_PDEATHSIG = 1
REPLICAS_FOLDER = "replicas"  # <scratch>/replicas/<index>: each replica's own writable folder
_TEMPLATE_LIMITS = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=2)


def template(wire: protocol.Wire, settings: WorkerSettings, channel: Any, first: protocol.Frame) -> int:
    """Be the template from the first REPLICATE on: fork a replica per REPLICATE until CLOSE or EOF.

    ``channel`` is the conversation's ``work.Channel`` on ``wire`` (its lock keeps the frames of
    the repository's questions apart from these); a replica points it at its own channel.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # replicas that end are reaped by the kernel
    frame = first
    while True:
        if frame.kind == protocol.CLOSE:
            frame.close_fds()
            return EXIT_OK
        kind, fields, fds = _replicate(frame, wire, settings, channel)
        try:
            with channel.lock:
                wire.send(kind, fields, fds=fds, deadline=None)
        except (protocol.FrameError, OSError) as exc:
            print(f"safehub worker: could not answer a REPLICATE: {exc}", file=sys.stderr)
            return EXIT_SOFTWARE
        finally:
            for fd in fds:
                os.close(fd)
        try:
            with channel.lock:
                frame = wire.receive(deadline=None, limits=_TEMPLATE_LIMITS)
            protocol.check_message(frame, (protocol.REPLICATE, protocol.CLOSE))
        except protocol.FrameEOF:
            return EXIT_OK
        except protocol.FrameError as exc:
            print(f"safehub worker: the template's channel broke the protocol: {exc}", file=sys.stderr)
            return EXIT_SOFTWARE


def _replicate(frame: protocol.Frame, wire: protocol.Wire, settings: WorkerSettings, channel: Any) -> tuple[str, dict[str, Any], list[int]]:
    """Fork one replica for this REPLICATE; the REPLICATED reply (the template keeps no fd of it)."""
    index = frame.fields["index"]
    if not frame.fds or not 0 <= index < 1 << 16:
        frame.close_fds()
        return protocol.REPLICATED, {"error": "a REPLICATE needs the replica's channel and an index below 65536"}, []
    replica_fd, procs_fd = frame.fds[0], (frame.fds[1] if len(frame.fds) > 1 else None)
    template_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        frame.close_fds()
        return protocol.REPLICATED, {"error": f"the worker may not fork a replica: {exc}"}, []
    if pid == 0:
        _become_replica(template_pid, index, replica_fd, procs_fd, wire, settings, channel)
    frame.close_fds()
    return protocol.REPLICATED, {"pid": pid}, [os.pidfd_open(pid)]


def _become_replica(template_pid: int, index: int, replica_fd: int, procs_fd: int | None, wire: protocol.Wire,
                    settings: WorkerSettings, channel: Any) -> NoReturn:
    code = EXIT_SOFTWARE
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the template goes -> so does every replica
        if os.getppid() != template_pid:
            os._exit(EXIT_SOFTWARE)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # A session of its own: where the scheduler groups tasks by session (autogroup), N
        # replicas in one would share one worker's CPU on a busy machine.
        os.setsid()
        if procs_fd is not None:
            os.write(procs_fd, b"0")  # "0": this process, into the replica's own memory cgroup
        wire.sock.detach()  # the template's channel: its fd is closed below, never by this object
        close_other_fds((0, 1, 2, replica_fd))
        privatize_shared_memory()
        own_dir = _confine(settings, index)
        os.chdir(own_dir)
        os.environ["HOME"] = os.environ["TMPDIR"] = own_dir
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
        import socket

        from . import remote

        channel.sock = protocol.Wire(socket.socket(fileno=replica_fd))  # the repository's questions go here now
        code = remote.serve(channel.sock, settings, channel, replicas_allowed=False)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _confine(settings: WorkerSettings, index: int) -> str:
    """Enter this replica's own Landlock domain; its writable folder."""
    scratch = os.path.realpath(settings.scratch_dir)
    folder = os.path.join(scratch, REPLICAS_FOLDER)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    own = os.path.join(folder, str(index))
    os.mkdir(own, 0o700)
    # What the template wrote (the repository's view, fetched files) stays readable; the other
    # replicas' folders do not: each entry of the scratch but theirs gets a read rule.
    template_files = [os.path.join(scratch, name) for name in os.listdir(scratch) if name != REPLICAS_FOLDER]
    read = grants.system_read_paths() + grants.worker_read_paths(settings.repo_dir, settings.extra_read_paths, settings.view_dir)
    result = landlock.restrict(read + template_files, [own], allow_tcp=settings.network)
    if not result.get("applied"):
        raise OSError(f"a replica needs a Landlock domain of its own: {result.get('reason', 'not applied')}")
    return own


# -- shared memory made private --------------------------------------------------------------

_PROT = {"r": 0x1, "w": 0x2, "x": 0x4}
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MAP_FAILED = ctypes.c_void_p(-1).value


def shared_writable_mappings() -> list[tuple[int, int, int]]:
    """(start, end, prot) of each mapping of this process that is shared and may be made writable
    (``VmFlags`` ``ms`` and ``mw``): a write there would be seen by every process that shares it."""
    found = []
    with open("/proc/self/smaps") as smaps:
        current: tuple[int, int, int] | None = None
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                perms = line.split()[1]
                current = (start, end, sum(_PROT[c] for c in perms[:3] if c in _PROT))
            elif head == "VmFlags:" and current is not None:
                flags = line.split()[1:]
                if "ms" in flags and "mw" in flags:
                    found.append(current)
                current = None
    return found


def privatize_shared_memory() -> None:
    """Replace each shared, writable-able mapping by a private copy at the same address.

    Raises OSError where one cannot be copied: a replica must not keep a page it shares."""
    lib = libc()
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.mremap.restype = ctypes.c_void_p
    lib.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for start, end, prot in shared_writable_mappings():
        size = end - start
        copy = lib.mmap(None, size, 0x1 | 0x2, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if copy in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"no memory for a private copy of a shared mapping of {size} bytes")
        if prot & 0x1:
            ctypes.memmove(copy, start, size)
        lib.mprotect(copy, size, prot)
        if lib.mremap(copy, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, start) in (None, _MAP_FAILED):
            lib.munmap(copy, size)
            raise OSError(ctypes.get_errno(), "a shared mapping could not be replaced by a private copy")
