"""How a warm worker gets its call: with its fork, or later from the zygote (a spare worker).

The zygote (``zygote.py``) forks each worker's supervisor with a socket of its own. A worker forked
for a call has the call's descriptors already (:func:`fresh`); a spare is forked ahead of the next
call, for the shape of the last one (``confine.Shape``: its namespaces and memory cgroup), and its
work process waits on that socket for the call's descriptors (:func:`spare`): so a call finds its
processes forked, its namespaces made and its cgroup entered. A spare takes one call and is then
that call's worker, like any other; it is never reused.

Either way the work process then tells the zygote the call's shape (TAKEN), the shape the next
spare is prepared for. A spare prepared for another shape says so (``taken`` false) and exits; the
zygote forks a worker for the call instead. Nothing of a call reaches the zygote: the settings
memfd is read here, in the call's own processes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, NoReturn

from . import protocol, supervisor, work
from .protocol import EXIT_OK, EXIT_SUPERVISOR, WorkerSettings
from .sandbox import confine

_MAX_CALL_BYTES = 64 * 1024 * 1024
_SEND_TIMEOUT_S = 5.0
_TAKE_LIMITS = protocol.Limits(max_header_bytes=64 * 1024, max_buffers=0, max_fds=len(protocol.TAKE_FDS))


def fresh(post_fd: int, parent_fd: int, channel_fd: int, stdout_fd: int, stderr_fd: int, call_fd: int) -> NoReturn:
    """In a supervisor forked for a call: take the call's session, stdio, folder and environment,
    then supervise (its work process reports the call's shape to the zygote)."""
    try:
        os.setsid()  # no controlling terminal, no signals from the caller's process group
        settings = _take_call(stdout_fd, stderr_fd, call_fd)
        shape = confine.shape_of(settings)
    except BaseException as exc:
        _failed(exc)

    def take(prepared: confine.Prepared) -> work.Call:
        _tell(post_fd, shape, taken=True)
        return work.Call(settings, channel_fd)

    supervisor.supervise(parent_fd, shape, (channel_fd, post_fd), take)


def spare(post_fd: int, parent_fd: int, shape: confine.Shape) -> NoReturn:
    """In a supervisor forked ahead of a call: prepare ``shape``, and have the work process wait
    for its call on ``post_fd`` (it exits when the zygote lets it go)."""
    try:
        os.setsid()
    except OSError as exc:
        _failed(exc)
    supervisor.supervise(parent_fd, shape, (post_fd,), lambda prepared: _wait_for_call(post_fd, prepared))


def _wait_for_call(post_fd: int, prepared: confine.Prepared) -> work.Call:
    post = socket.socket(fileno=post_fd)
    try:
        frame = protocol.check_message(protocol.recv_frame(post, deadline=None, limits=_TAKE_LIMITS), (protocol.TAKE,))
    except protocol.FrameError:
        os._exit(EXIT_OK)  # the zygote let this spare go (or it is gone): nothing ran here
    if len(frame.fds) != len(protocol.TAKE_FDS):
        os._exit(EXIT_SUPERVISOR)
    channel_fd, stdout_fd, stderr_fd, call_fd = frame.fds
    settings = _take_call(stdout_fd, stderr_fd, call_fd)
    shape = confine.shape_of(settings)
    taken = prepared.shape.serves(shape)
    _tell(post.detach(), shape, taken=taken)
    if not taken:
        os._exit(EXIT_OK)
    return work.Call(settings, channel_fd)


def _take_call(stdout_fd: int, stderr_fd: int, call_fd: int) -> WorkerSettings:
    """Make the call's stdio, environment and working folder this process's; return its settings."""
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in (stdout_fd, stderr_fd):
        os.close(fd)
    call = json.loads(_read_all(call_fd))
    os.close(call_fd)
    settings, environ = WorkerSettings.from_dict(call["settings"]), call["environ"]
    os.chdir(settings.scratch_dir)
    os.environ.clear()
    os.environ.update(environ)
    _fresh_process_state()
    return settings


def _tell(post_fd: int, shape: confine.Shape, *, taken: bool) -> None:
    """TAKEN to the zygote (best effort: a zygote that is gone needs no shape), then close."""
    post = socket.socket(fileno=post_fd)
    try:
        protocol.send_frame(post, protocol.TAKEN, {"shape": shape.as_dict(), "taken": taken},
                            deadline=time.monotonic() + _SEND_TIMEOUT_S)
    except (protocol.FrameError, OSError):
        pass
    finally:
        post.close()


def _read_all(fd: int) -> bytes:
    data = bytearray()
    while len(data) <= _MAX_CALL_BYTES:
        chunk = os.pread(fd, 1024 * 1024, len(data))  # pread: the parent's writes moved the offset
        if not chunk:
            return bytes(data)
        data += chunk
    raise ValueError("the call's settings are too large")


def _fresh_process_state() -> None:
    """Give what a fresh interpreter seeds at start a seed of its own (random reseeds at fork)."""
    random = sys.modules.get("numpy.random")  # seeded once, here, if anything imported it
    if random is not None:
        random.seed()


def _failed(exc: BaseException) -> NoReturn:
    try:
        os.write(2, f"safehub worker: the supervisor could not take the call: {exc}\n".encode())
    finally:
        os._exit(EXIT_SUPERVISOR)


def shape_from(data: Any, cgroup: str | None) -> confine.Shape:
    """The shape a TAKEN reported, for the next spare, in the memory cgroup the parent made for it."""
    shape = confine.Shape.from_dict(data)
    return confine.Shape(shape.namespaces, shape.user, shape.network, cgroup)
