"""The parent <-> worker wire format: one small versioned module, standard library only.

It lives in the worker's folder because both sides speak it: the worker imports it relatively,
the parent as ``safehub._worker.protocol`` (with ``layout`` and ``grants``, the only worker
modules the parent may import). Its errors are its own (:class:`FrameError` and subclasses); the
parent maps them to ``safehub.errors`` at one boundary (``safehub/_run/process.py``, the worker's
channel), and reads every frame of a conversation in one place (``safehub/_run/conversation.py``).

A frame, all integers big-endian::

    prefix    12 bytes, struct ">4sHHI": magic b"SHUB", PROTOCOL_VERSION, buffer count, header length
    lengths   8 bytes per buffer, struct ">Q"
    header    a JSON object, ASCII only: {"v": PROTOCOL_VERSION, "kind": str, ["fds": int,] ...fields}
    buffers   raw bytes, back to back, as many and as long as the lengths say

File descriptors (``SCM_RIGHTS`` over the ``AF_UNIX`` socketpair) ride on the bytes of the frame's
head; the header's ``"fds"`` field (absent means 0) says how many must arrive, and any other
number is an error.

Messages. Every kind is declared once, in :data:`MESSAGES`, with who sends it and its typed
fields; :func:`check_message` holds a received frame to its declaration (required fields
present, every declared field of its type; fields a newer peer adds are ignored). A call is a
conversation on the call's channel:

    parent -> worker   CALL     {action, model, returns} [+ one buffer: pickle of (args, kwargs)]
    worker -> parent   ASK      {id, what, args}: the worker needs something mid-call and waits;
                                one question at a time: it reads the reply before it asks again
    parent -> worker   ANSWER   {id, value} [+ buffers, fds], or
                       REFUSE   {id, reason}; or the parent ends the call (kills the worker)
    worker -> parent   RESULT   {action, ...} or ERROR {error, type, message, traceback, ...}: the end

A remote model (CALL with returns "remote") keeps the conversation open after its RESULT
{action: "load", returns: "remote", methods, class}: the model stays in the worker, and each call
on the parent's handle is one exchange, data only (``values.py`` describes the value trees):

    parent -> worker   INVOKE   {method, call, inference} + tensors' bytes (one buffer, memfds)
    worker -> parent   ASK ...  refused: a remote model's calls may not fetch
    worker -> parent   RETURNED {value} + tensors' bytes, or {value: null, transport, sizes} (state_dict:
                                the weights layout), or FAILED {error, type, message, traceback}
    parent -> worker   CLOSE    {}: the worker exits (the parent kills the tree if it does not)

Replicas (``replicas=N``, ``replicas.py``): instead of a first INVOKE the parent may send

    parent -> worker   REPLICATE  {index} + the replica's channel [+ its memory cgroup's cgroup.procs,
                                  opened for writing]: the work process, now a template that serves
                                  no call, forks a replica that serves INVOKEs on that channel
    worker -> parent   REPLICATED {pid} + a pidfd of the replica, or {error} (the fork was refused)

The warm path speaks to its zygote in the same frames, on the zygote's own sockets:

    zygote -> parent   READY    {pid, namespaces}: once, on the control socket
    parent -> zygote   SPAWN    {}: SPAWN_FDS in that order; the settings descriptor is a memfd
                                holding {"settings": WorkerSettings, "environ": {...}} as JSON,
                                which the zygote hands to the new supervisor unread
    zygote -> parent   SPAWNED  {pid} + a pidfd of the supervisor, or {error} (fork failed)
    zygote -> parent   EXITED   {status}: its raw wait status, once the supervisor ended

Versioning: a new optional field keeps the version; a change of meaning bumps it, and a frame of
any other version is refused. Version 2: results as shards (``"sizes"``) in the layout of
``layout.py``. Version 3: the call is a conversation (CALL replaces REQUEST; ASK, ANSWER,
REFUSE), every message is declared with typed fields, and the worker's settings are a typed
structure (:class:`WorkerSettings`). The remote mode (INVOKE, RETURNED, FAILED, CLOSE, and
RESULT's optional "methods" and "class") came within version 3: no frame that existed changed
meaning, and a peer that does not know a kind refuses it by kind (:func:`check_message`).

Every read has a deadline (``time.monotonic()`` seconds, or ``None`` for no limit) enforced with
``poll``; every length is checked against :class:`Limits` *before* anything is allocated for it,
so a hostile peer can neither hang the reader nor make it allocate memory it did not send; a
header's JSON nodes are counted before it is parsed (``Limits.max_header_nodes``); buffers are
received straight into their final, writable place (:attr:`Frame.buffers`), so no reader copies them.
"""

from __future__ import annotations

import array
import json
import math
import mmap
import os
import select
import socket
import struct
import time
from dataclasses import MISSING, asdict, dataclass, field, fields as dataclass_fields
from typing import Any, Iterable, Sequence

from . import with_article

PROTOCOL_VERSION = 3
MAGIC = b"SHUB"
PREFIX = struct.Struct(">4sHHI")
LENGTH = struct.Struct(">Q")
RESERVED_FIELDS = ("v", "kind", "fds")

# Message kinds (declared with their fields in MESSAGES below).
CALL = "call"
ASK = "ask"
ANSWER = "answer"
REFUSE = "refuse"
RESULT = "result"
ERROR = "error"
READY = "ready"
SPAWN = "spawn"
SPAWNED = "spawned"
EXITED = "exited"
INVOKE = "invoke"
RETURNED = "returned"
FAILED = "failed"
CLOSE = "close"
REPLICATE = "replicate"
REPLICATED = "replicated"
SPAWN_FDS = ("reply", "channel", "stdout", "stderr", "settings")

# How a worker process ends (the supervisor mirrors the work process; the zygote uses the same).
EXIT_OK = 0  # an answer (RESULT or ERROR) was sent
EXIT_USAGE = 64  # bad command line
EXIT_SOFTWARE = 70  # the worker failed outside the repository's code
EXIT_SUPERVISOR = 71  # the supervisor failed, or its parent was gone
EXIT_MEMORY = 72  # memory ran out under memory_limit outside the repository's code (a new code: no new meaning)
EXIT_MEANINGS = {
    EXIT_USAGE: "the worker's command line was refused (a safehub bug)",
    EXIT_SOFTWARE: "the worker failed outside the repository's code (see its stderr above)",
    EXIT_SUPERVISOR: "the worker's supervisor failed, or saw its parent gone",
    EXIT_MEMORY: "the worker ran out of memory under memory_limit before the repository's code ran",
}

_CHUNK = 1024 * 1024
_INT_SIZE = array.array("i").itemsize
# Plain ints: the socket module's flags are enums, whose arithmetic costs microseconds per read.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


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
    # JSON values and containers in the header, counted before it is parsed: parsing costs the
    # reader ~80 bytes per node, so bytes alone would let 16 MiB of "{}," cost 445 MiB.
    max_header_nodes: int = 1_000_000
    max_buffers: int = 4
    max_buffer_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_fds: int = 0


Received = bytearray | mmap.mmap  # a received buffer: writable, in its final place


@dataclass
class Frame:
    """One decoded frame. ``fields`` excludes the reserved keys; the receiver owns ``fds``."""

    kind: str
    fields: dict[str, Any]
    buffers: list[Received] = field(default_factory=list)  # writable: read once, in place
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
    # One sendmsg for the head and the buffers, tried before any poll: a small frame costs one
    # system call. The fds ride on its first bytes, which are the head's.
    pending = [memoryview(head), *views]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while True:
        _check_deadline(deadline)
        try:
            sent = sock.sendmsg(pending, ancillary)
            break
        except BlockingIOError:
            _wait(sock, select.POLLOUT, deadline)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise FrameEOF("the peer closed the channel") from exc
    for view in pending:
        if sent >= len(view):
            sent -= len(view)
            continue
        _send_all(sock, view[sent:], deadline)
        sent = 0


def send_and_close(sock: socket.socket, kind: str, fields: dict[str, Any], buffers: Sequence[bytes | bytearray | memoryview],
                   fds: Sequence[int], *, deadline: float | None) -> None:
    """Send one frame and close ``fds`` whatever happens: the peer has its copies, or none are needed."""
    try:
        send_frame(sock, kind, fields, buffers, fds, deadline=deadline)
    finally:
        _close_all(fds)


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
        # All the lengths in one read, checked before the header is waited for.
        raw_lengths = reader.read(LENGTH.size * nbuffers) if nbuffers else b""
        lengths = [LENGTH.unpack_from(raw_lengths, LENGTH.size * i)[0] for i in range(nbuffers)]
        for n in lengths:
            if n > limits.max_buffer_bytes:
                raise FrameError(f"buffer of {n} bytes, more than the cap of {limits.max_buffer_bytes}")
        if sum(lengths) > limits.max_total_bytes:
            raise FrameError(f"buffers total {sum(lengths)} bytes, more than the cap of {limits.max_total_bytes}")
        raw_header = reader.read(header_len)
        nodes = count_nodes(raw_header)
        if nodes > limits.max_header_nodes:
            raise FrameError(f"a header of {nodes} JSON nodes, more than the cap of {limits.max_header_nodes} nodes")
        header = parse_header(raw_header)
        buffers = [reader.read_buffer(n) for n in lengths]
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


def count_nodes(raw: bytes | bytearray) -> int:
    """An upper bound of the values and containers in a JSON text, without parsing it: each value
    but a container's first follows a comma (commas inside strings only make the bound higher)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
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

    def read(self, n: int) -> bytearray:
        """``n`` bytes of the frame's head, grown as they arrive (a piece of at most ``_CHUNK`` at
        a time, never pre-sized): a declared length costs nothing until sent."""
        data = bytearray()
        while len(data) < n:
            piece = bytearray(min(n - len(data), _CHUNK))
            got = self._recv_into(memoryview(piece), len(data), n)
            if got == n:
                return piece  # the whole read at once: no copy
            data += memoryview(piece)[:got]
        return data

    def read_buffer(self, n: int) -> Received:
        """One of the frame's buffers, received straight into its final, writable place: no copy
        follows, here or in a decoder. A large one is an anonymous mapping, whose pages cost
        memory only as bytes arrive, so a declared length costs nothing until sent (a small one,
        at most ``_CHUNK``, is allocated ahead)."""
        if n == 0:
            return bytearray()
        data: Received = bytearray(n) if n <= _CHUNK else mmap.mmap(-1, n)
        with memoryview(data) as view:
            filled = 0
            while filled < n:
                filled += self._recv_into(view[filled:], filled, n)
        return data

    def _recv_into(self, view: memoryview, done: int, n: int) -> int:
        """Bytes received into ``view`` (at least one), with any fds that came along. Each read is
        tried first and polled for only when nothing is there yet."""
        while True:
            _check_deadline(self.deadline)
            try:
                got, ancdata, flags, _ = self.sock.recvmsg_into([view], self.ancbufsize, _MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                _wait(self.sock, select.POLLIN, self.deadline)
                continue
            except ConnectionResetError as exc:
                raise FrameEOF("the peer reset the channel") from exc
            if ancdata or flags & _MSG_CTRUNC:
                self._take_fds(ancdata, flags)
            if not got:
                raise FrameEOF(f"the channel closed after {done} of {n} bytes")
            return got

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
                self.fds.extend(fds)
        if flags & _MSG_CTRUNC or len(self.fds) > self.max_fds:
            # The kernel closes the fds it could not deliver; the ones it did are closed by recv_frame.
            raise FrameError(f"more than {self.max_fds} file descriptors sent with one frame")


def _send_all(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    while view:
        _check_deadline(deadline)
        try:
            n = sock.send(view[:_CHUNK])
        except BlockingIOError:
            _wait(sock, select.POLLOUT, deadline)
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise FrameEOF("the peer closed the channel") from exc
        view = view[n:]


def _check_deadline(deadline: float | None) -> None:
    """Past the deadline, no more reads or writes: even a peer that keeps a trickle going is cut off."""
    if deadline is not None and time.monotonic() >= deadline:
        raise FrameTimeout("the deadline passed while waiting on the channel")


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


# -- messages ----------------------------------------------------------------------------------

_NONE = type(None)
JSON_VALUE = (str, int, float, bool, list, dict, _NONE)


@dataclass(frozen=True)
class Field:
    """One header field: the JSON types it may have (exact: a bool is not an int) and whether it must be there."""

    types: tuple[type, ...]
    required: bool = True


@dataclass(frozen=True)
class Message:
    """One kind of frame: who sends it, its fields, and how many buffers and fds it may carry."""

    kind: str
    sender: str  # "parent", "worker" or "zygote"
    fields: dict[str, Field]
    max_buffers: int = 0
    max_fds: int = 0


def _opt(*types: type) -> Field:
    return Field(types, required=False)


MAX_VALUE_FDS = 8  # memfds with one INVOKE or RETURNED (the encoders write at most 4)
# A remote model's wire method names besides its own methods: reading a plain attribute (its
# name the one argument), and the methods answered in the weights layout rather than as values.
REMOTE_GETATTR = "__getattr__"
REMOTE_WEIGHTS_METHODS = ("state_dict", "named_parameters")


MESSAGES: dict[str, Message] = {
    m.kind: m
    for m in (
        Message(CALL, "parent", {"action": Field((str,)), "model": Field((str, _NONE)), "returns": Field((str,))}, max_buffers=1),
        Message(ASK, "worker", {"id": Field((int,)), "what": Field((str,)), "args": Field((dict,))}),
        Message(ANSWER, "parent", {"id": Field((int,)), "value": Field(JSON_VALUE)}, max_buffers=4, max_fds=4),
        Message(REFUSE, "parent", {"id": Field((int,)), "reason": Field((str,))}),
        Message(
            RESULT,
            "worker",
            {
                "action": Field((str,)),
                "entrypoints": _opt(list),
                "doc": _opt(str, _NONE),
                "returns": _opt(str),
                "transport": _opt(str),
                "sizes": _opt(list),
                "sandbox": _opt(dict),
                "methods": _opt(list),
                "class": _opt(str),
            },
            max_buffers=1,
            max_fds=8,
        ),
        Message(
            ERROR,
            "worker",
            {
                "error": Field((str,)),
                "type": _opt(str),
                "message": _opt(str),
                "traceback": _opt(str),
                "phase": _opt(str),
                "missing": _opt(list),
                "model": _opt(str),
                "suggestions": _opt(list),
                "limit": _opt(str),
                "layer": _opt(str),
                "sandbox": _opt(dict),
            },
        ),
        Message(INVOKE, "parent", {"method": Field((str,)), "call": Field((dict,)), "inference": Field((bool,))},
                max_buffers=1, max_fds=MAX_VALUE_FDS),
        Message(RETURNED, "worker", {"value": Field(JSON_VALUE), "transport": _opt(str), "sizes": _opt(list), "self": _opt(bool)},
                max_buffers=1, max_fds=MAX_VALUE_FDS),
        Message(FAILED, "worker", {"error": Field((str,)), "type": _opt(str), "message": _opt(str), "traceback": _opt(str),
                                   "limit": _opt(str)}),
        Message(CLOSE, "parent", {}),
        Message(REPLICATE, "parent", {"index": Field((int,))}, max_fds=2),
        Message(REPLICATED, "worker", {"pid": _opt(int), "error": _opt(str)}, max_fds=1),
        Message(READY, "zygote", {"pid": Field((int,)), "namespaces": Field((bool,))}),
        Message(SPAWN, "parent", {}, max_fds=len(SPAWN_FDS)),
        Message(SPAWNED, "zygote", {"pid": _opt(int), "error": _opt(str)}, max_fds=1),
        Message(EXITED, "zygote", {"status": Field((int,))}),
    )
}


def check_message(frame: Frame, expected: Iterable[str]) -> Frame:
    """Hold a received frame to its declaration: one of the ``expected`` kinds, typed fields,
    no more buffers or fds than it may carry. Raises FrameError (the frame's fds stay the caller's)."""
    expected = tuple(expected)
    if frame.kind not in expected:
        raise FrameError(f"a {frame.kind[:40]!r} frame where {' or '.join(expected)} was expected")
    message = MESSAGES[frame.kind]
    if len(frame.buffers) > message.max_buffers or len(frame.fds) > message.max_fds:
        raise FrameError(f"a {frame.kind} frame with {len(frame.buffers)} buffers and {len(frame.fds)} fds")
    for name, spec in message.fields.items():
        if name not in frame.fields:
            if spec.required:
                raise FrameError(f"a {frame.kind} frame without its {name!r} field")
            continue
        if type(frame.fields[name]) not in spec.types:
            raise FrameError(f"{with_article(str(frame.kind))} frame whose {name!r} is {with_article(type(frame.fields[name]).__name__)}")
    return frame


# -- the worker's settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker is told about its call: the sandbox's limits and layers, and its folders.

    The parent makes it (``Sandbox.worker_settings``); it travels as JSON (on the command line of
    a cold worker, in a memfd through the zygote) and the worker reads it with :meth:`from_json`,
    which checks every field's type, so both sides agree on one typed structure.
    """

    repo_dir: str
    scratch_dir: str
    timeout: float
    layers: tuple[str, ...]
    require: tuple[str, ...] = ()
    applied_by_parent: tuple[str, ...] = ()
    memory_limit: int | None = None
    cpu_time: float | None = None
    max_processes: int | None = None
    max_open_files: int | None = None
    max_file_size: int | None = None
    max_scratch_size: int | None = None  # bytes the worker may write in all (a tmpfs on its scratch)
    network: bool = False
    extra_read_paths: tuple[str, ...] = ()
    view_dir: str | None = None  # the call's view of the cache (fetched files, nested repositories), read-only
    # The memory cgroup the parent made for this call (a folder under /sys/fs/cgroup), whose limit
    # of memory_limit counts the whole sandbox; None: the address-space bound (memory_shares).
    memory_cgroup: str | None = None

    def replace(self, **changes: Any) -> WorkerSettings:
        return WorkerSettings(**{**asdict(self), **changes})

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True, allow_nan=False, separators=(",", ":"))

    def memory_shares(self, *, in_bubblewrap: bool = False) -> MemoryShares:
        """How ``memory_limit`` bounds everything the sandbox holds: the one rule, for both sides.

        With a memory cgroup the kernel counts every page of the sandbox (processes, memfds,
        tmpfs, pipes) against the limit: each process keeps the whole limit as address space and
        the scratch tmpfs its ``max_scratch_size``. Without one the limit is split: the scratch
        tmpfs gets at most a quarter, each descriptor's buffers ``DESCRIPTOR_BUFFER_BYTES`` (a
        pipe's 64 KiB, a socket's default send buffer: seccomp refuses growing them), and the one
        address space the rest; seccomp refuses new processes and memfds (``one_address_space``).
        bubblewrap's own /tmp and /dev/shm are tmpfs too (``BUBBLEWRAP_TMPFS_BYTES``, and no
        larger than the scratch), and counted. Without ``max_scratch_size`` the scratch is the
        disk, not memory. No ``memory_limit``: nothing is bounded.
        """
        if self.memory_limit is None:
            return MemoryShares(None, self.max_scratch_size, one_address_space=False)
        if self.memory_cgroup is not None:
            return MemoryShares(self.memory_limit, self.max_scratch_size, one_address_space=False)
        # No max_scratch_size: the scratch is the disk, not a tmpfs; bubblewrap's own stay.
        scratch = None if self.max_scratch_size is None else min(self.memory_limit // 4, self.max_scratch_size)
        tmpfs = scratch or 0
        if in_bubblewrap:
            tmpfs += 2 * min(BUBBLEWRAP_TMPFS_BYTES, scratch or BUBBLEWRAP_TMPFS_BYTES)
        buffers = (self.max_open_files or DEFAULT_OPEN_FILES) * DESCRIPTOR_BUFFER_BYTES
        return MemoryShares(max(0, self.memory_limit - tmpfs - buffers), scratch, one_address_space=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        return cls.from_dict(strict_json_loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> WorkerSettings:
        """Raises ValueError on anything but the declared fields with their declared types."""
        if not isinstance(data, dict):
            raise ValueError("the worker's settings are not a JSON object")
        known = {f.name: f for f in dataclass_fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown worker settings: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            kinds = _SETTING_TYPES[name]
            if isinstance(value, list) and tuple in kinds:
                if not all(type(item) is str for item in value):
                    raise ValueError(f"worker setting {name} must be a list of str")
                value = tuple(value)
            elif type(value) not in kinds and not (float in kinds and type(value) is int):
                raise ValueError(f"worker setting {name} is {with_article(type(value).__name__)}")
            values[name] = value
        missing = [n for n, f in known.items() if n not in values and f.default is MISSING]
        if missing:
            raise ValueError(f"worker settings lack {missing}")
        return cls(**values)


# Without a memory cgroup, the bytes each descriptor may hold in the kernel: a pipe keeps its
# default 64 KiB (F_SETPIPE_SZ refused), a socket its default send buffer (208 KiB; SO_SNDBUF
# and SO_RCVBUF refused), with room for the kernel's own accounting.
DESCRIPTOR_BUFFER_BYTES = 256 * 1024
DEFAULT_OPEN_FILES = 1024  # counted where no max_open_files is set
BUBBLEWRAP_TMPFS_BYTES = 256 * 1024 * 1024  # bubblewrap's /tmp and /dev/shm: at most this, and the scratch's size


@dataclass(frozen=True)
class MemoryShares:
    """What :meth:`WorkerSettings.memory_shares` gives: bytes of address space per process
    (RLIMIT_AS; None: unbounded), bytes of the scratch tmpfs, and whether the workload is held
    to one address space (no new processes, no memfds)."""

    address_space: int | None
    scratch: int | None
    one_address_space: bool


# The JSON types of each setting (tuples travel as lists of str).
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "repo_dir": (str,),
    "scratch_dir": (str,),
    "timeout": (float,),
    "layers": (tuple,),
    "require": (tuple,),
    "applied_by_parent": (tuple,),
    "memory_limit": (int, _NONE),
    "cpu_time": (float, _NONE),
    "max_processes": (int, _NONE),
    "max_open_files": (int, _NONE),
    "max_file_size": (int, _NONE),
    "max_scratch_size": (int, _NONE),
    "network": (bool,),
    "extra_read_paths": (tuple,),
    "view_dir": (str, _NONE),
    "memory_cgroup": (str, _NONE),
}
