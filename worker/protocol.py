"""The parent <-> worker wire format: one small versioned module, standard library only.

It lives in the worker's folder because both sides speak it: the worker imports it relatively,
the parent as ``safehub._worker.protocol`` (with ``layout`` and ``grants``, the only worker
modules the parent may import). Its errors are its own (:class:`FrameError` and subclasses); the
parent maps them to ``safehub.errors`` at one boundary (``safehub/_run/process.py``, the worker's
channel), and reads every frame of a conversation in one place (``safehub/_run/conversation.py``).

A frame, all integers little-endian, every part struct-packed::

    prefix    14 bytes, struct "<4sHBBHI": magic b"SHUB", PROTOCOL_VERSION, the kind's code
              (``Message.code``), the number of fds, the buffer count, the header's length
    lengths   8 bytes per buffer, struct "<Q"
    header    the fields, each: its number (its place in the kind's declaration, one byte), a tag
              (one byte), its value: none, false, true, an int ("<q"), a finite float ("<d"),
              a str (UTF-8), bytes, or JSON (lists, dicts; strict, ASCII, its nodes counted before
              it is parsed), the last three as a "<I" length and that many bytes; numbers strictly
              increasing, so no field comes twice
    buffers   raw bytes, back to back, as many and as long as the lengths say

File descriptors (``SCM_RIGHTS`` over the ``AF_UNIX`` socketpair) ride on the bytes of the frame's
head; the prefix says how many must arrive, and any other number is an error. No message is JSON
as a whole any more: only a field whose value is a list or a dict (ASK's args, ERROR's sandbox
report, RESULT's entrypoints and sizes) is a JSON text inside the header.

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

    parent -> worker   INVOKE   {method, call, inference, result_pool?} + tensors' bytes (one buffer,
                                memfds, the input pool), and the result pool's fd last (pools.py)
    worker -> parent   ASK ...  refused: a remote model's calls may not fetch
    worker -> parent   RETURNED {value, pooled?} + tensors' bytes (one buffer, memfds; ``pooled``
                                bytes of the result pool), or {value: null, transport, sizes} (state_dict:
                                the weights layout), or FAILED {error, type, message, traceback}
    parent -> worker   CLOSE    {}: the worker exits (the parent kills the tree if it does not)

Replicas (``replicas=N``, ``replicas.py``): instead of a first INVOKE the parent may send

    parent -> worker   REPLICATE  {index} + the replica's channel [+ its memory cgroup's cgroup.procs,
                                  opened for writing]: the work process, now a template that serves
                                  no call, forks a replica that serves INVOKEs on that channel
    worker -> parent   REPLICATED {pid} + a pidfd of the replica, or {error} (the fork was refused)

The warm path speaks to its zygote in the same frames, on the zygote's own sockets:

    zygote -> parent   READY    {pid, namespaces}: once, on the control socket
    parent -> zygote   SPAWN    {[spare_cgroup]}: SPAWN_FDS in that order; the settings descriptor is
                                a memfd holding {"settings": WorkerSettings, "environ": {...}} as
                                JSON, which the zygote hands to the call's worker unread;
                                spare_cgroup: the memory cgroup for the next spare worker
    zygote -> parent   SPAWNED  {pid} + a pidfd of the supervisor, or {error} (fork failed)
    zygote -> parent   EXITED   {status}: its raw wait status, once the supervisor ended

and to each worker it forks, on a socket of their own:

    zygote -> worker   TAKE     {}: TAKE_FDS (a spare worker's call)
    worker -> zygote   TAKEN    {shape, taken}: the call's shape (the next spare's); taken false:
                                a spare prepared for another shape, which then exits

Versioning: a new optional field keeps the version (it goes last in its declaration; a reader
skips a number it does not know); a change of meaning bumps it, and a frame of any other version
is refused. Version 2: results as shards (``"sizes"``) in the layout of ``layout.py``. Version 3:
the call is a conversation (CALL replaces REQUEST; ASK, ANSWER, REFUSE), every message is
declared with typed fields, and the worker's settings are a typed structure
(:class:`WorkerSettings`); the remote mode (INVOKE, RETURNED, FAILED, CLOSE) came within it.
Version 4: the binary header above (it was a JSON object), and the value trees of INVOKE's
"call" and RETURNED's "value" are bytes in ``values.py``'s binary layout (they were JSON). The
pools of a remote model (INVOKE's optional "result_pool", RETURNED's optional "pooled") came
within version 4.

Every read and write has a deadline (``time.monotonic()`` seconds, or ``None`` for no limit): a
blocking socket with the kernel's ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (:class:`Wire`); every length is
checked against :class:`Limits` *before* anything is allocated for it, so a hostile peer can
neither hang the reader nor make it allocate memory it did not send; a header's JSON nodes are
counted before they are parsed (``Limits.max_header_nodes``); large buffers are received straight
into their final, writable place (:attr:`Frame.buffers`), so no reader copies them.
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

PROTOCOL_VERSION = 4
MAGIC = b"SHUB"
PREFIX = struct.Struct("<4sHBBHI")  # magic, version, kind code, fds, buffers, header length
LENGTH = struct.Struct("<Q")
FIELD = struct.Struct("<BB")  # a field's number (its place in the declaration), its tag
COUNT = struct.Struct("<I")
INT = struct.Struct("<q")
FLOAT = struct.Struct("<d")
# Field tags: what follows a field's number.
T_NONE, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_STR, T_BYTES, T_JSON = range(8)

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
TAKE = "take"
TAKEN = "taken"
SPAWN_FDS = ("reply", "channel", "stdout", "stderr", "settings")
TAKE_FDS = SPAWN_FDS[1:]  # a call's own descriptors, as the zygote hands them to a spare worker

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
_SMALL = 64 * 1024  # a Wire's receive buffer: a frame up to this size arrives with one recvmsg
# How long a call's channel looks for the next frame before it sleeps (``Wire(spin=...)``). On
# this 2-vCPU virtual machine, quiet, a process that sleeps between a remote model's calls pays
# for it twice: the wake-up, and code that then runs 2-3x slower than in a loop (a ping-pong with
# the codec's work on both sides measured 220-250 µs against 75-85 µs of that work done in one
# process). Looking for 1 ms (yielding the CPU between looks, so a peer on the same CPU runs):
# a tiny call 384-394 µs instead of 483-555 (benchmarks/bench_remote.py --sections a, interleaved).
# Under load it gains nothing (57-94 µs against 49-70 for a Wire ping-pong at load 6.8), and it
# costs at most 1 ms of CPU per frame that does not come within it.
SPIN_S = 0.001
_INT_SIZE = array.array("i").itemsize
# Plain ints: the socket module's flags are enums, whose arithmetic costs microseconds per read.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SO_RCVTIMEO = int(socket.SO_RCVTIMEO)
_SO_SNDTIMEO = int(socket.SO_SNDTIMEO)
_TIMEVAL = struct.Struct("@ll")


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
    # JSON values and containers in the header's JSON fields, counted before they are parsed:
    # parsing costs the reader ~80 bytes per node, so bytes alone would let 16 MiB of "{}," cost 445 MiB.
    max_header_nodes: int = 1_000_000
    max_buffers: int = 4
    max_buffer_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_fds: int = 0


Received = bytearray | mmap.mmap  # a received buffer: writable, in its final place


class Frame:
    """One decoded frame. ``fields`` excludes the reserved keys; the receiver owns ``fds``."""

    __slots__ = ("kind", "fields", "buffers", "fds")

    def __init__(self, kind: str, fields: dict[str, Any], buffers: list[Received] | None = None,
                 fds: list[int] | None = None) -> None:
        self.kind = kind
        self.fields = fields
        self.buffers: list[Received] = [] if buffers is None else buffers  # writable: read once, in place
        self.fds: list[int] = [] if fds is None else fds

    def __repr__(self) -> str:
        return f"Frame({self.kind!r}, {sorted(self.fields)}, {len(self.buffers)} buffers, {len(self.fds)} fds)"

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        _close_all(fds)


def encode_head(kind: str, fields: dict[str, Any] | None = None, buffer_lengths: Sequence[int] = (), nfds: int = 0) -> bytes:
    """The prefix, lengths and header of a frame: everything but the buffers. ValueError for a
    kind or field :data:`MESSAGES` does not declare, or a value no tag carries."""
    message = MESSAGES.get(kind)
    if message is None:
        raise ValueError(f"no message kind {kind!r}")
    body = encode_fields(message, fields or {})
    if len(buffer_lengths) == 1:  # the common case, without a join
        lengths = LENGTH.pack(buffer_lengths[0])
    else:
        lengths = b"".join([LENGTH.pack(n) for n in buffer_lengths])
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, message.code, nfds, len(buffer_lengths), len(body)) + lengths + body


def encode_fields(message: Message, fields: dict[str, Any]) -> bytes:
    """A header: each field present as its number, a tag and its value, in declaration order."""
    out = bytearray()
    found = 0
    for number, name in enumerate(message.names):
        if name not in fields:
            continue
        found += 1
        value = fields[name]
        kind = type(value)
        if value is None:
            out += FIELD.pack(number, T_NONE)
        elif kind is bool:
            out += FIELD.pack(number, T_TRUE if value else T_FALSE)
        elif kind is int and -(2**63) <= value < 2**63:
            out += FIELD.pack(number, T_INT) + INT.pack(value)
        elif kind is float:
            if not math.isfinite(value):
                raise ValueError(f"the field {name!r} is not a finite float")
            out += FIELD.pack(number, T_FLOAT) + FLOAT.pack(value)
        elif kind is str:
            data = value.encode("utf-8")
            out += FIELD.pack(number, T_STR) + COUNT.pack(len(data)) + data
        elif kind in (bytes, bytearray):
            out += FIELD.pack(number, T_BYTES) + COUNT.pack(len(value)) + value
        else:  # lists, dicts, huge ints: strict JSON, ASCII, the same bytes on every platform
            data = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
            out += FIELD.pack(number, T_JSON) + COUNT.pack(len(data)) + data
    if found != len(fields):
        unknown = sorted(set(fields) - set(message.names))
        raise ValueError(f"a {message.kind} frame declares no field {unknown[0]!r}")
    return bytes(out)


def decode_fields(message: Message, raw: bytes | bytearray | memoryview | mmap.mmap, max_nodes: int) -> dict[str, Any]:
    """The header's fields, read as hostile: numbers strictly increasing (no field twice), every
    length inside the header, UTF-8 strict, floats finite, JSON strict and its nodes counted first.
    A number past the declaration (a newer peer's field) is skipped."""
    names = message.names
    fields: dict[str, Any] = {}
    at, end, last, nodes = 0, len(raw), -1, 0
    try:
        while at < end:
            number, tag = FIELD.unpack_from(raw, at)
            at += 2
            if number <= last:
                raise FrameError(f"a {message.kind} frame whose fields are out of order or repeated")
            last = number
            if tag == T_NONE:
                value: Any = None
            elif tag == T_FALSE:
                value = False
            elif tag == T_TRUE:
                value = True
            elif tag == T_INT:
                (value,) = INT.unpack_from(raw, at)
                at += 8
            elif tag == T_FLOAT:
                (value,) = FLOAT.unpack_from(raw, at)
                at += 8
                if not math.isfinite(value):
                    raise FrameError(f"a {message.kind} frame with a float field that is not finite")
            elif tag in (T_STR, T_BYTES, T_JSON):
                (n,) = COUNT.unpack_from(raw, at)
                at += 4
                if at + n > end:
                    raise FrameError(f"a {message.kind} frame's field runs past its header")
                data = raw[at : at + n]
                at += n
                if tag == T_BYTES:
                    value = bytes(data)
                elif tag == T_STR:
                    value = str(data, "utf-8")
                else:
                    nodes += count_nodes(data)
                    if nodes > max_nodes:
                        raise FrameError(f"a header of {nodes} JSON nodes, more than the cap of {max_nodes} nodes")
                    value = strict_json_loads(str(data, "ascii"))
            else:
                raise FrameError(f"a {message.kind} frame with a field of unknown tag {tag}")
            if number < len(names):
                fields[names[number]] = value
    except struct.error:
        raise FrameError(f"a {message.kind} frame's header ends inside a field") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON
        raise FrameError(f"malformed frame header: {str(exc)[:200]}") from None
    return fields


def count_nodes(raw: bytes | bytearray | memoryview) -> int:
    """An upper bound of the values and containers in a JSON text, without parsing it: each value
    but a container's first follows a comma (commas inside strings only make the bound higher)."""
    raw = bytes(raw) if isinstance(raw, memoryview) else raw
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


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


class Wire:
    """One end of a frame channel: a blocking socket whose every read and write has a deadline.

    The socket is put in blocking mode once; a deadline is the kernel's ``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO``, set only when the time left is shorter than the one set before (so a call
    costs no extra system call), with ``poll`` only after an early ``EAGAIN`` (a peer that made a
    shared descriptor non-blocking). A ``buffered`` wire (the parent's and the worker's ends of a
    call's channel, each owning its socket) reads up to 64 KiB at a time: a small frame arrives
    with one ``recvmsg``, and bytes past its end (a peer that sent two frames at once) wait for
    the next read. Otherwise (:func:`recv_frame`) it never reads past the frame, as a socket
    shared with other readers needs.

    ``spin`` (seconds; the call's channel passes :data:`SPIN_S`): before it sleeps for a frame, a
    buffered wire looks for one without sleeping, yielding the CPU between looks. A reply, or
    the next call of a loop of calls, that comes within that time costs no wake-up of this
    process (a cross-CPU wake-up of a sleeping process costs tens of microseconds on a virtual
    machine); at most ``spin`` of CPU is spent per frame when nothing comes.
    """

    def __init__(self, sock: socket.socket, *, buffered: bool = True, spin: float = 0.0) -> None:
        if sock.gettimeout() is not None:
            sock.setblocking(True)
        self.sock = sock
        self.buffered = buffered
        self.spin = spin if buffered else 0.0
        self.buf = bytearray(_SMALL if buffered else 0)
        self.start = self.end = 0  # the unread bytes: buf[start:end]
        self.fds: list[int] = []  # arrived and not yet given to a frame
        self.rcv_timeout = -1.0  # seconds set as SO_RCVTIMEO (0: none, -1: unknown)
        self.snd_timeout = -1.0

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -------------------------------------------------------------------------------

    def send(self, kind: str, fields: dict[str, Any] | None = None, buffers: Sequence[bytes | bytearray | memoryview] = (),
             fds: Sequence[int] = (), *, deadline: float | None = None) -> None:
        """Send one frame, passing ``fds`` with SCM_RIGHTS. The caller keeps (and closes) its fds."""
        views = [memoryview(b).cast("B") for b in buffers] if buffers else []
        head = encode_head(kind, fields, [len(v) for v in views], len(fds))
        # One sendmsg for the head and the buffers: a small frame costs one system call. The fds
        # ride on its first bytes, which are the head's.
        pending: list[bytes | memoryview] = [head, *views]
        total = len(head) + sum(len(v) for v in views)
        ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = self._sendmsg(pending, ancillary, deadline)
        if sent == total:
            return
        for piece in pending:
            view = memoryview(piece)
            if sent >= len(view):
                sent -= len(view)
                continue
            view = view[sent:]
            sent = 0
            while view:
                view = view[self._sendmsg([view[:_CHUNK]], [], deadline):]

    def send_and_close(self, kind: str, fields: dict[str, Any], buffers: Sequence[bytes | bytearray | memoryview],
                       fds: Sequence[int], *, deadline: float | None) -> None:
        """Send one frame and close ``fds`` whatever happens: the peer has its copies, or none are needed."""
        try:
            self.send(kind, fields, buffers, fds, deadline=deadline)
        finally:
            _close_all(fds)

    def _sendmsg(self, pieces: list[Any], ancillary: list[Any], deadline: float | None) -> int:
        while True:
            self.snd_timeout = _arm(self.sock, _SO_SNDTIMEO, self.snd_timeout, deadline)
            try:
                return self.sock.sendmsg(pieces, ancillary)
            except BlockingIOError:
                _wait(self.sock, select.POLLOUT, deadline)  # the kernel's timeout, or a non-blocking peer
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise FrameEOF("the peer closed the channel") from exc

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, *, deadline: float | None, limits: Limits = Limits()) -> Frame:
        """Read one whole frame, or raise FrameError (FrameEOF, FrameTimeout). Never blocks past ``deadline``.

        Every length is checked against ``limits`` before anything is allocated for it; a large
        buffer is received straight into its final, writable place (an anonymous mapping whose
        pages cost memory only as bytes arrive), a small one copied out of the receive buffer.
        """
        try:
            frame = self._receive(deadline, limits)
        except BaseException:
            # Whatever arrived with a refused frame is closed, never left open in this process,
            # and the stream is out of step: nothing more is read from it.
            fds, self.fds = self.fds, []
            _close_all(fds)
            self.start = self.end = 0
            raise
        return frame

    def _receive(self, deadline: float | None, limits: Limits) -> Frame:
        ancbufsize = socket.CMSG_SPACE((limits.max_fds + 1) * _INT_SIZE)
        if self.start == self.end:
            self.start = self.end = 0  # nothing unread: the next frame starts at the buffer's start
            if self.spin:
                self._spin(ancbufsize, limits.max_fds)
        self._fill(PREFIX.size, deadline, ancbufsize, limits.max_fds)
        magic, version, code, nfds, nbuffers, header_len = PREFIX.unpack_from(self.buf, self.start)
        if magic != MAGIC:
            raise FrameError(f"bad magic {bytes(magic)!r}: not a safehub frame")
        if version != PROTOCOL_VERSION:
            raise FrameError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
        message = _BY_CODE.get(code)
        if message is None:
            raise FrameError(f"a frame of unknown kind {code}")
        if nbuffers > limits.max_buffers:
            raise FrameError(f"{nbuffers} buffers, more than the cap of {limits.max_buffers}")
        if header_len > limits.max_header_bytes:
            raise FrameError(f"header of {header_len} bytes, more than the cap of {limits.max_header_bytes}")
        if nfds > limits.max_fds:
            raise FrameError(f"more than {limits.max_fds} file descriptors sent with one frame")
        self.start += PREFIX.size
        # All the lengths, checked before the header is waited for.
        lengths: list[int] = []
        if nbuffers:
            self._fill(LENGTH.size * nbuffers, deadline, ancbufsize, limits.max_fds)
            lengths = [LENGTH.unpack_from(self.buf, self.start + LENGTH.size * i)[0] for i in range(nbuffers)]
            self.start += LENGTH.size * nbuffers
            for n in lengths:
                if n > limits.max_buffer_bytes:
                    raise FrameError(f"buffer of {n} bytes, more than the cap of {limits.max_buffer_bytes}")
            if sum(lengths) > limits.max_total_bytes:
                raise FrameError(f"buffers total {sum(lengths)} bytes, more than the cap of {limits.max_total_bytes}")
        header = self._take(header_len, deadline, ancbufsize, limits.max_fds)
        fields = decode_fields(message, header, limits.max_header_nodes)
        buffers = [self._take(n, deadline, ancbufsize, limits.max_fds) for n in lengths]
        # The fds ride on the frame's first bytes, so they are here by now; more than announced,
        # with nothing of a next frame read yet, is a peer out of step.
        if len(self.fds) < nfds or (len(self.fds) > nfds and self.start == self.end):
            raise FrameError(f"the frame announces {nfds} file descriptors, {len(self.fds)} arrived")
        fds, self.fds = self.fds[:nfds], self.fds[nfds:]
        return Frame(message.kind, fields, buffers, fds)

    def _fill(self, n: int, deadline: float | None, ancbufsize: int, max_fds: int) -> None:
        """At least ``n`` (at most the buffer's size) unread bytes in ``buf``."""
        if self.end - self.start >= n:
            return
        if len(self.buf) < n or self.start + n > len(self.buf):
            unread = self.buf[self.start : self.end]
            if len(self.buf) < n:
                self.buf = bytearray(max(n, len(self.buf)))
            self.buf[: len(unread)] = unread
            self.start, self.end = 0, len(unread)
        stop = len(self.buf) if self.buffered else self.start + n  # unbuffered: never past what is needed
        with memoryview(self.buf) as view:
            while self.end - self.start < n:
                self.end += self._recv_into(view[self.end : stop], ancbufsize, max_fds, deadline)

    def _spin(self, ancbufsize: int, max_fds: int) -> None:
        """Look for the next frame without sleeping, for up to ``spin`` seconds: a reply that comes
        within that time costs no wake-up of this process (tens of microseconds on a virtual CPU)."""
        until = time.perf_counter() + self.spin
        sock = self.sock
        with memoryview(self.buf) as view:
            while True:
                try:
                    got, ancdata, flags, _ = sock.recvmsg_into([view], ancbufsize, _MSG_CMSG_CLOEXEC | _MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter() >= until:
                        return
                    os.sched_yield()  # the peer may share this CPU: let it run
                    continue
                except ConnectionResetError as exc:
                    raise FrameEOF("the peer reset the channel") from exc
                self.end += self._received(got, ancdata, flags, max_fds)
                return

    def _take(self, n: int, deadline: float | None, ancbufsize: int, max_fds: int) -> Received:
        """The next ``n`` bytes, in a writable object of their own: copied out of the receive
        buffer when they are there, else the rest received straight into place."""
        if n == 0:
            return bytearray()
        if n <= _SMALL and self.buffered:
            self._fill(n, deadline, ancbufsize, max_fds)
        have = min(n, self.end - self.start)
        if have == n:
            data: Received = self.buf[self.start : self.start + n]
            self.start += n
            return data
        data = bytearray(n) if n <= _CHUNK else mmap.mmap(-1, n)
        with memoryview(data) as view:
            view[:have] = memoryview(self.buf)[self.start : self.start + have]
            self.start = self.end = 0
            filled = have
            while filled < n:
                filled += self._recv_into(view[filled:], ancbufsize, max_fds, deadline)
        return data

    def _recv_into(self, view: memoryview, ancbufsize: int, max_fds: int, deadline: float | None) -> int:
        """Bytes received into ``view`` (at least one), with any fds that came along."""
        while True:
            self.rcv_timeout = _arm(self.sock, _SO_RCVTIMEO, self.rcv_timeout, deadline)
            try:
                got, ancdata, flags, _ = self.sock.recvmsg_into([view], ancbufsize, _MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                _wait(self.sock, select.POLLIN, deadline)  # the kernel's timeout, or a non-blocking peer
                continue
            except ConnectionResetError as exc:
                raise FrameEOF("the peer reset the channel") from exc
            return self._received(got, ancdata, flags, max_fds)

    def _received(self, got: int, ancdata: list[tuple[int, int, bytes]], flags: int, max_fds: int) -> int:
        """After a ``recvmsg``, sleeping or not: keep the fds that came along; ``got``, never 0."""
        if ancdata or flags & _MSG_CTRUNC:
            self._take_fds(ancdata, flags, max_fds)
        if not got:
            raise FrameEOF("the channel closed before a whole frame arrived")
        return got

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]], flags: int, max_fds: int) -> None:
        for level, kind, payload in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
                self.fds.extend(fds)
        if flags & _MSG_CTRUNC or len(self.fds) > max_fds:
            # The kernel closes the fds it could not deliver; the ones it did are closed by receive().
            raise FrameError(f"more than {max_fds} file descriptors sent with one frame")


def send_frame(
    sock: socket.socket | Wire,
    kind: str,
    fields: dict[str, Any] | None = None,
    buffers: Sequence[bytes | bytearray | memoryview] = (),
    fds: Sequence[int] = (),
    *,
    deadline: float | None = None,
) -> None:
    """Send one frame on a :class:`Wire`, or on a socket no Wire owns (the zygote's, a cold path)."""
    _wire(sock).send(kind, fields, buffers, fds, deadline=deadline)


def send_and_close(sock: socket.socket | Wire, kind: str, fields: dict[str, Any], buffers: Sequence[bytes | bytearray | memoryview],
                   fds: Sequence[int], *, deadline: float | None) -> None:
    """Send one frame and close ``fds`` whatever happens: the peer has its copies, or none are needed."""
    _wire(sock).send_and_close(kind, fields, buffers, fds, deadline=deadline)


def recv_frame(sock: socket.socket | Wire, *, deadline: float | None, limits: Limits = Limits()) -> Frame:
    """Read one whole frame from a :class:`Wire`, or from a socket no Wire owns, never a byte past it."""
    return _wire(sock).receive(deadline=deadline, limits=limits)


def _wire(sock: socket.socket | Wire) -> Wire:
    return sock if isinstance(sock, Wire) else Wire(sock, buffered=False)


def _arm(sock: socket.socket, option: int, current: float, deadline: float | None) -> float:
    """The kernel's timeout for the next read or write (``option``): no later than ``deadline``.
    Set only when the one set before would wait too long; returns the one now set."""
    if deadline is None:
        if current != 0.0:
            sock.setsockopt(_SOL_SOCKET, option, _TIMEVAL.pack(0, 0))
        return 0.0
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        # Past the deadline, no more reads or writes: even a peer that keeps a trickle going is cut off.
        raise FrameTimeout("the deadline passed while waiting on the channel")
    if 0.0 < current <= remaining:
        return current
    remaining = max(remaining, 0.001)  # a zero timeval would mean "no timeout"
    seconds = int(remaining)
    sock.setsockopt(_SOL_SOCKET, option, _TIMEVAL.pack(seconds, int((remaining - seconds) * 1e6)))
    return remaining


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
    """One kind of frame: its code on the wire, who sends it, its fields (numbered on the wire by
    their place here: a new field goes last), and how many buffers and fds it may carry."""

    code: int
    kind: str
    sender: str  # "parent", "worker" or "zygote"
    fields: dict[str, Field]
    max_buffers: int = 0
    max_fds: int = 0
    names: tuple[str, ...] = ()  # derived: the fields' names by number
    numbers: dict[str, int] = field(default_factory=dict)  # derived: each field's number

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.fields))
        object.__setattr__(self, "numbers", {name: number for number, name in enumerate(self.fields)})


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
        Message(1, CALL, "parent", {"action": Field((str,)), "model": Field((str, _NONE)), "returns": Field((str,))}, max_buffers=1),
        Message(2, ASK, "worker", {"id": Field((int,)), "what": Field((str,)), "args": Field((dict,))}),
        Message(3, ANSWER, "parent", {"id": Field((int,)), "value": Field(JSON_VALUE)}, max_buffers=4, max_fds=4),
        Message(4, REFUSE, "parent", {"id": Field((int,)), "reason": Field((str,))}),
        Message(
            5,
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
            6,
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
        # result_pool: the last fd is the result pool (worker/pools.py); pooled: the bytes of it a
        # RETURNED's value uses, its segment after the frame's memfds.
        Message(7, INVOKE, "parent", {"method": Field((str,)), "call": Field((bytes,)), "inference": Field((bool,)),
                                      "result_pool": _opt(bool)},
                max_buffers=1, max_fds=MAX_VALUE_FDS),
        Message(8, RETURNED, "worker", {"value": Field((bytes, _NONE)), "transport": _opt(str), "sizes": _opt(list), "self": _opt(bool),
                                        "pooled": _opt(int)},
                max_buffers=1, max_fds=MAX_VALUE_FDS),
        Message(9, FAILED, "worker", {"error": Field((str,)), "type": _opt(str), "message": _opt(str), "traceback": _opt(str),
                                   "limit": _opt(str)}),
        Message(10, CLOSE, "parent", {}),
        Message(11, READY, "zygote", {"pid": Field((int,)), "namespaces": Field((bool,))}),
        Message(12, SPAWN, "parent", {"spare_cgroup": _opt(str, _NONE)}, max_fds=len(SPAWN_FDS)),
        Message(13, SPAWNED, "zygote", {"pid": _opt(int), "error": _opt(str)}, max_fds=1),
        Message(14, EXITED, "zygote", {"status": Field((int,))}),
        Message(15, REPLICATE, "parent", {"index": Field((int,))}, max_fds=2),
        Message(16, REPLICATED, "worker", {"pid": _opt(int), "error": _opt(str)}, max_fds=1),
        Message(17, TAKE, "zygote", {}, max_fds=len(TAKE_FDS)),
        Message(18, TAKEN, "worker", {"shape": Field((dict,)), "taken": Field((bool,))}),
    )
}
_BY_CODE: dict[int, Message] = {m.code: m for m in MESSAGES.values()}


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
