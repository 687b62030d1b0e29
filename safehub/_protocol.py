"""Frames between the parent and the worker: one small versioned module, standard library only.

The worker loads this file by path (it never imports the ``safehub`` package), so it may import
nothing but the standard library. Its errors are its own (:class:`FrameError` and subclasses);
the parent maps them to ``safehub.errors`` at one boundary (``_isolation.py``).

A frame, all integers big-endian::

    prefix    12 bytes, struct ">4sHHI": magic b"SHUB", PROTOCOL_VERSION, buffer count, header length
    lengths   8 bytes per buffer, struct ">Q"
    header    a JSON object, ASCII only: {"v": PROTOCOL_VERSION, "kind": str, ["fds": int,] ...fields}
    buffers   raw bytes, back to back, as many and as long as the lengths say

The warm path adds a second conversation, parent <-> zygote (``safehub/_zygote.py`` and
``safehub/_worker/zygote.py``), in the same frames on their own sockets:

    READY    zygote -> parent, once, on the control socket: {"pid": int, "namespaces": bool}
             (whether the zygote's children can enter namespaces with unshare)
    SPAWN    parent -> zygote, on the control socket: no fields; SPAWN_FDS in that order. The
             settings descriptor is a memfd holding {"settings": {...}, "environ": {...}} as
             JSON; the zygote hands it to the new supervisor unread.
    SPAWNED  zygote -> parent, on the call's reply socket: {"pid": int} with one descriptor, a
             pidfd of the supervisor; or {"error": str} and none when the fork failed
    EXITED   zygote -> parent, on the reply socket, once the supervisor ended:
             {"status": int}, its raw wait status; then the zygote closes the reply socket

These kinds travel only on the zygote's own sockets and change nothing a worker's frames mean.

File descriptors (``SCM_RIGHTS`` over the ``AF_UNIX`` socketpair) ride on the bytes of the frame's
head; the header's ``"fds"`` field (absent means 0) says how many must arrive, and any other
number is an error. Versioning: a new optional field keeps the version; a change of meaning bumps
it, and a frame of any other version is refused. Version 2: a load RESULT carries ``"sizes"``
(one per memfd or buffer: the result's shards) instead of ``"size"``, and an object result is
the shared layout of ``_results.py`` (storages beside the pickle) instead of bare cloudpickle.

Every read has a deadline (``time.monotonic()`` seconds, or ``None`` for no limit) enforced with
``poll``; every length is checked against :class:`Limits` *before* anything is allocated for it,
so a hostile peer can neither hang the reader nor make it allocate memory it did not send.
"""

from __future__ import annotations

import array
import json
import math
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

PROTOCOL_VERSION = 2
MAGIC = b"SHUB"
PREFIX = struct.Struct(">4sHHI")
LENGTH = struct.Struct(">Q")
RESERVED_FIELDS = ("v", "kind", "fds")

# Frame kinds. Parent -> worker: REQUEST. Worker -> parent: RESULT or ERROR.
REQUEST = "request"
RESULT = "result"
ERROR = "error"
# Parent <-> zygote (the warm path): new kinds on their own sockets; the worker's are unchanged.
READY = "ready"
SPAWN = "spawn"
SPAWNED = "spawned"
EXITED = "exited"
SPAWN_FDS = ("reply", "channel", "stdout", "stderr", "settings")

_CHUNK = 1024 * 1024
_INT_SIZE = array.array("i").itemsize


class FrameError(Exception):
    """The bytes on the channel break the protocol."""


class FrameEOF(FrameError):
    """The peer closed the channel (before or inside a frame)."""


class FrameTimeout(FrameError):
    """The deadline passed before a whole frame arrived (or could be sent)."""


@dataclass(frozen=True)
class Limits:
    """Caps a reader applies to one frame. The defaults suit small control frames."""

    max_header_bytes: int = 1024 * 1024
    max_buffers: int = 4
    max_buffer_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_fds: int = 0


@dataclass
class Frame:
    """One decoded frame. ``fields`` excludes the reserved keys; the receiver owns ``fds``."""

    kind: str
    fields: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        _close_all(fds)


def encode_head(kind: str, fields: dict[str, Any] | None = None, buffer_lengths: Sequence[int] = (), nfds: int = 0) -> bytes:
    """The prefix, lengths and header of a frame: everything but the buffers."""
    fields = fields or {}
    clash = [name for name in RESERVED_FIELDS if name in fields]
    if clash:
        raise ValueError(f"reserved frame fields: {clash}")
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": kind}
    if nfds:
        header["fds"] = nfds
    header.update(fields)
    # ASCII only and no NaN: the same bytes on every platform, and strict JSON a reader can check.
    body = json.dumps(header, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    lengths = b"".join(LENGTH.pack(n) for n in buffer_lengths)
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(buffer_lengths), len(body)) + lengths + body


def send_frame(
    sock: socket.socket,
    kind: str,
    fields: dict[str, Any] | None = None,
    buffers: Sequence[bytes | bytearray | memoryview] = (),
    fds: Sequence[int] = (),
    *,
    deadline: float | None = None,
) -> None:
    """Send one frame, passing ``fds`` with SCM_RIGHTS. The caller keeps (and closes) its fds."""
    views = [memoryview(b).cast("B") for b in buffers]
    head = encode_head(kind, fields, [len(v) for v in views], len(fds))
    sock.setblocking(False)
    sent = 0
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            _wait(sock, select.POLLOUT, deadline)
            try:
                sent = sock.sendmsg([head], ancillary)
                break
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise FrameEOF("the peer closed the channel") from exc
    _send_all(sock, memoryview(head)[sent:], deadline)
    for view in views:
        _send_all(sock, view, deadline)


def recv_frame(sock: socket.socket, *, deadline: float | None, limits: Limits = Limits()) -> Frame:
    """Read one whole frame, or raise FrameError (FrameEOF, FrameTimeout). Never blocks past ``deadline``."""
    reader = _Reader(sock, deadline, limits.max_fds)
    try:
        magic, version, nbuffers, header_len = PREFIX.unpack(reader.read(PREFIX.size))
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}: not a safehub frame")
        if version != PROTOCOL_VERSION:
            raise FrameError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
        if nbuffers > limits.max_buffers:
            raise FrameError(f"{nbuffers} buffers, more than the cap of {limits.max_buffers}")
        if header_len > limits.max_header_bytes:
            raise FrameError(f"header of {header_len} bytes, more than the cap of {limits.max_header_bytes}")
        lengths = [LENGTH.unpack_from(reader.read(LENGTH.size))[0] for _ in range(nbuffers)]
        for n in lengths:
            if n > limits.max_buffer_bytes:
                raise FrameError(f"buffer of {n} bytes, more than the cap of {limits.max_buffer_bytes}")
        if sum(lengths) > limits.max_total_bytes:
            raise FrameError(f"buffers total {sum(lengths)} bytes, more than the cap of {limits.max_total_bytes}")
        header = parse_header(reader.read(header_len))
        buffers = [reader.read(n) for n in lengths]
        nfds = header.pop("fds", 0)
        if type(nfds) is not int or nfds != len(reader.fds):
            raise FrameError(f"the header announces {nfds!r} file descriptors, {len(reader.fds)} arrived")
        kind = header.pop("kind")
        del header["v"]
        frame = Frame(kind, header, buffers, reader.fds)
        reader.fds = []
        return frame
    finally:
        # Whatever arrived with a refused frame is closed, never left open in this process.
        _close_all(reader.fds)


def parse_header(raw: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object, no duplicate keys, no NaN, the right version, a str kind."""
    try:
        header = strict_json_loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"malformed frame header: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("the frame header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION or type(header.get("v")) is not int:
        raise FrameError(f"header version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    if not isinstance(header.get("kind"), str):
        raise FrameError("the frame header has no 'kind'")
    return header


def strict_json_loads(text: str) -> Any:
    """JSON from a hostile peer: duplicate keys and NaN/Infinity refused (ValueError)."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two readers could pick different duplicates; refuse instead of guessing.
        raise ValueError("duplicate key in JSON object")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Reader:
    """Exact reads from a non-blocking socket with a deadline, collecting SCM_RIGHTS fds."""

    def __init__(self, sock: socket.socket, deadline: float | None, max_fds: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.deadline = deadline
        self.max_fds = max_fds
        # Room for one more fd than allowed, so a sender that exceeds the cap is seen (MSG_CTRUNC).
        self.ancbufsize = socket.CMSG_SPACE((max_fds + 1) * _INT_SIZE)
        self.fds: list[int] = []

    def read(self, n: int) -> bytes:
        # Grown as bytes arrive (never pre-sized), so a declared length costs nothing until sent.
        data = bytearray()
        while len(data) < n:
            _wait(self.sock, select.POLLIN, self.deadline)
            try:
                chunk, ancdata, flags, _ = self.sock.recvmsg(
                    min(n - len(data), _CHUNK), self.ancbufsize, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            except ConnectionResetError as exc:
                raise FrameEOF("the peer reset the channel") from exc
            self._take_fds(ancdata, flags)
            if not chunk:
                raise FrameEOF(f"the channel closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC or len(self.fds) > self.max_fds:
            # The kernel closes the fds it could not deliver; the ones it did are closed by recv_frame.
            raise FrameError(f"more than {self.max_fds} file descriptors sent with one frame")


def _send_all(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    while view:
        _wait(sock, select.POLLOUT, deadline)
        try:
            n = sock.send(view[:_CHUNK])
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise FrameEOF("the peer closed the channel") from exc
        view = view[n:]


def _wait(sock: socket.socket, events: int, deadline: float | None) -> None:
    """Block until ``sock`` is ready for ``events`` (or hung up), or raise FrameTimeout."""
    poller = select.poll()
    poller.register(sock, events)
    while True:
        if deadline is None:
            timeout_ms = None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout("the deadline passed while waiting on the channel")
            timeout_ms = max(1, math.ceil(remaining * 1000))
        if poller.poll(timeout_ms):
            return


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
