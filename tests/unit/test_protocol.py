"""The parent<->worker frame format: golden bytes, round trips, and every way a peer can misbehave."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from safehub._worker import protocol as _protocol
from safehub._worker.protocol import FrameEOF, FrameError, FrameTimeout, Limits, recv_frame, send_frame

SOON = 5.0  # seconds: a generous deadline for reads that must succeed


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def deadline(seconds: float = SOON) -> float:
    return time.monotonic() + seconds


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def raw_frame(header: bytes, buffers: list[bytes] = (), *, magic=b"SHUB", version=4, code=5, nfds=0, nbuf=None) -> bytes:
    """A frame built by hand (``code`` 5 is RESULT), whatever its header holds."""
    nbuf = len(buffers) if nbuf is None else nbuf
    lengths = b"".join(struct.pack("<Q", len(b)) for b in buffers)
    return struct.pack("<4sHBBHI", magic, version, code, nfds, nbuf, len(header)) + lengths + header + b"".join(buffers)


def field(number: int, tag: int, payload: bytes = b"") -> bytes:
    return bytes([number, tag]) + payload


def sized(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# -- golden bytes ------------------------------------------------------------------------------


GOLDEN_HEAD = (
    b"SHUB"  # magic
    b"\x04\x00"  # PROTOCOL_VERSION
    b"\x05"  # the kind's code: RESULT
    b"\x00"  # no fds
    b"\x01\x00"  # one buffer
    b"\x15\x00\x00\x00"  # header length (21)
    b"\x03\x00\x00\x00\x00\x00\x00\x00"  # the buffer's length
    b"\x00\x05\x04\x00\x00\x00list"  # field 0 (action), a str of 4 bytes
    b'\x01\x07\x05\x00\x00\x00["a"]'  # field 1 (entrypoints), JSON of 5 bytes
)
GOLDEN_INVOKE = (
    b"SHUB\x04\x00\x07\x00\x00\x00\x17\x00\x00\x00"  # INVOKE (code 7), no fds, no buffers, 23 bytes
    b"\x00\x05\x08\x00\x00\x00__call__"  # field 0 (method), a str
    b"\x01\x06\x01\x00\x00\x00\x00"  # field 1 (call), bytes: one node, None
    b"\x02\x02"  # field 2 (inference), true
)


def test_golden_head_bytes():
    assert _protocol.PROTOCOL_VERSION == 4
    # Fields are written in their declared order, whatever the dict's.
    head = _protocol.encode_head("result", {"entrypoints": ["a"], "action": "list"}, [3])
    assert head == GOLDEN_HEAD
    assert _protocol.encode_head("invoke", {"inference": True, "call": b"\x00", "method": "__call__"}) == GOLDEN_INVOKE


def test_golden_frame_decodes(pair):
    a, b = pair
    a.sendall(GOLDEN_HEAD + b"xyz" + GOLDEN_INVOKE)
    wire = _protocol.Wire(b)
    frame = wire.receive(deadline=deadline())
    assert (frame.kind, frame.fields, frame.buffers, frame.fds) == ("result", {"action": "list", "entrypoints": ["a"]}, [b"xyz"], [])
    frame = wire.receive(deadline=deadline())  # the second frame came with the first read: kept, not lost
    assert (frame.kind, frame.fields) == ("invoke", {"method": "__call__", "call": b"\x00", "inference": True})


def test_fds_are_counted_in_the_prefix():
    head = _protocol.encode_head("result", {}, [], nfds=2)
    assert head[7] == 2


def test_undeclared_kinds_and_fields_are_refused():
    with pytest.raises(ValueError, match="declares no field"):
        _protocol.encode_head("result", {"kind": "x"})
    with pytest.raises(ValueError, match="no message kind"):
        _protocol.encode_head("nonsense", {})
    with pytest.raises(ValueError, match="finite"):
        _protocol.encode_head("answer", {"id": 1, "value": math.nan})


def test_every_kind_has_its_own_code():
    codes = [m.code for m in _protocol.MESSAGES.values()]
    assert len(set(codes)) == len(codes) and all(0 < c < 256 for c in codes)


# -- round trips -------------------------------------------------------------------------------


def test_round_trip_with_buffers(pair):
    a, b = pair
    buffers = [b"", b"\x00" * 10, os.urandom(3 * 1024 * 1024)]
    fields = {"id": 2**70, "value": {"text": "h\u00e9llo \u2603", "n": 3, "nested": {"l": [1, None, True, 1.5]}}}
    thread = threading.Thread(target=send_frame, args=(a, "answer", fields, buffers), kwargs={"deadline": deadline()})
    thread.start()
    frame = recv_frame(b, deadline=deadline(), limits=Limits(max_buffer_bytes=4 << 20, max_total_bytes=8 << 20))
    thread.join()
    assert frame.kind == "answer" and frame.fields == fields and [bytes(b) for b in frame.buffers] == buffers
    assert all(not memoryview(b).readonly for b in frame.buffers)  # a decoder needs no copy to write them


def test_a_large_buffer_is_received_once_into_its_place(pair):
    # 64 MiB sent in 1 MiB pieces: the reader allocates no second copy of it (tracemalloc sees
    # every Python allocation; the buffer itself is an anonymous mapping, its pages filled in place).
    a, b = pair
    size = 64 << 20
    thread = threading.Thread(target=send_frame, args=(a, "call", {}, [bytes(size)]), kwargs={"deadline": deadline()})
    thread.start()
    tracemalloc.start()
    try:
        frame = recv_frame(b, deadline=deadline(), limits=Limits(max_buffer_bytes=size, max_total_bytes=size))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        thread.join()
    assert len(frame.buffers[0]) == size and not memoryview(frame.buffers[0]).readonly
    assert peak < 4 << 20, f"the reader allocated {peak >> 20} MiB for a {size >> 20} MiB buffer"


def test_a_header_is_counted_before_it_is_parsed(pair):
    a, b = pair
    args = b'{"x":[' + b"{}," * 999 + b"{}]}"
    body = field(0, _protocol.T_INT, struct.pack("<q", 1)) + field(1, _protocol.T_STR, sized(b"get")) + field(2, _protocol.T_JSON, sized(args))
    a.sendall(raw_frame(body, code=2))
    with pytest.raises(FrameError, match="a header of 2002 JSON nodes, more than the cap of 1000 nodes"):
        recv_frame(b, deadline=deadline(), limits=Limits(max_header_nodes=1000))


def test_count_nodes_bounds_the_values_of_a_json_text():
    assert _protocol.count_nodes(b'{"v":3,"kind":"x"}') == 3  # the object, two values (keys not counted)
    assert _protocol.count_nodes(b"[[],{},1]") == 6  # 4 values: each container counts its own bracket
    assert _protocol.count_nodes(b'"a,b,c"') == 3  # commas in strings: an upper bound only


def test_round_trip_with_fds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_frame(a, "result", {"action": "x"}, [b"data"], fds=[r], deadline=deadline())
        frame = recv_frame(b, deadline=deadline(), limits=Limits(max_fds=1))
        assert frame.buffers == [b"data"] and len(frame.fds) == 1
        os.write(w, b"through the passed fd")
        assert os.read(frame.fds[0], 100) == b"through the passed fd"
        frame.close_fds()
        assert frame.fds == []
    finally:
        os.close(r)
        os.close(w)


def test_consecutive_frames_stay_apart(pair):
    a, b = pair
    for i in range(3):
        send_frame(a, "exited", {"status": i}, [bytes([i]) * i])
    for i in range(3):
        frame = recv_frame(b, deadline=deadline())
        assert frame.fields == {"status": i} and frame.buffers == [bytes([i]) * i]


# -- short reads, EOF, timeouts ----------------------------------------------------------------


def test_short_reads_are_reassembled(pair):
    a, b = pair
    data = _protocol.encode_head("result", {"action": "v" * 50}, [5]) + b"12345"

    def trickle():
        for i in range(len(data)):
            a.send(data[i : i + 1])
            if i % 7 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=trickle)
    thread.start()
    frame = recv_frame(b, deadline=deadline())
    thread.join()
    assert frame.fields == {"action": "v" * 50} and frame.buffers == [b"12345"]


@pytest.mark.parametrize("cut", [0, 3, 14, 22, 30])
def test_early_eof_anywhere_is_a_clear_error(pair, cut):
    a, b = pair
    data = _protocol.encode_head("result", {"action": "v"}, [8]) + b"12345678"
    a.sendall(data[:cut])
    a.close()
    with pytest.raises(FrameEOF, match="closed"):
        recv_frame(b, deadline=deadline())


def test_silence_times_out_on_time(pair):
    _, b = pair
    start = time.monotonic()
    with pytest.raises(FrameTimeout):
        recv_frame(b, deadline=deadline(0.2))
    assert 0.15 < time.monotonic() - start < 2


def test_a_half_sent_frame_times_out(pair):
    a, b = pair
    a.sendall(_protocol.encode_head("result", {}, [100]) + b"only a part")
    with pytest.raises(FrameTimeout):
        recv_frame(b, deadline=deadline(0.2), limits=Limits())


def test_send_to_a_peer_that_never_reads_times_out(pair):
    a, _ = pair
    with pytest.raises(FrameTimeout):
        send_frame(a, "call", {}, [b"x" * (64 * 1024 * 1024)], deadline=deadline(0.3))


def test_send_to_a_closed_peer_is_eof(pair):
    a, b = pair
    b.close()
    with pytest.raises(FrameEOF):
        send_frame(a, "call", {}, [b"x" * 1024 * 1024], deadline=deadline())


# -- caps: nothing allocated for what was only announced ---------------------------------------


@pytest.mark.parametrize(
    "prefix, match",
    [
        (struct.pack("<4sHBBHI", b"SHUB", 4, 5, 0, 0, 0xFFFFFFFF), "header of 4294967295 bytes"),
        (struct.pack("<4sHBBHI", b"SHUB", 4, 5, 0, 0xFFFF, 2), "65535 buffers"),
        (struct.pack("<4sHBBHI", b"SHUB", 4, 5, 0, 1, 2) + struct.pack("<Q", 2**64 - 1), "buffer of"),
        (struct.pack("<4sHBBHI", b"SHUB", 4, 5, 0, 2, 2) + struct.pack("<QQ", 60 << 20, 60 << 20), "total"),
    ],
)
def test_huge_announcements_are_refused_without_allocating(pair, prefix, match):
    a, b = pair
    a.sendall(prefix)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=match):
            recv_frame(b, deadline=deadline())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_announced_buffer_bytes_are_not_preallocated(pair):
    a, b = pair
    a.sendall(struct.pack("<4sHBBHI", b"SHUB", 4, 5, 0, 1, 0) + struct.pack("<Q", 50 << 20))
    a.sendall(b"x" * 10)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTimeout):
            recv_frame(b, deadline=deadline(0.2), limits=Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


# -- malformed headers -------------------------------------------------------------------------


ACTION = field(0, 5, sized(b"list"))  # RESULT's action


@pytest.mark.parametrize(
    "frame, match",
    [
        (raw_frame(ACTION, magic=b"HTTP"), "magic"),
        (raw_frame(ACTION, version=1), "version 1"),  # frames of every older version: refused
        (raw_frame(ACTION, version=2), "version 2"),
        (raw_frame(ACTION, version=3), "version 3"),
        (raw_frame(b'{"v":3,"kind":"result","action":"list"}', version=3), "version 3"),  # a version 3 (JSON) header
        (raw_frame(ACTION, code=0), "unknown kind 0"),
        (raw_frame(ACTION, code=200), "unknown kind 200"),
        (raw_frame(ACTION + ACTION), "out of order or repeated"),
        (raw_frame(field(1, 7, sized(b"[]")) + ACTION), "out of order or repeated"),
        (raw_frame(field(0, 9)), "unknown tag 9"),
        (raw_frame(field(0, 5, struct.pack("<I", 1000) + b"list")), "runs past its header"),
        (raw_frame(field(0, 5, b"\x04\x00")), "ends inside a field"),
        (raw_frame(field(0, 3, b"\x01\x02")), "ends inside a field"),
        (raw_frame(b"\x00"), "ends inside a field"),
        (raw_frame(field(0, 5, sized(b"\xff"))), "malformed"),
        (raw_frame(field(0, 5, sized(b"\xed\xa0\x80"))), "malformed"),  # a surrogate is not UTF-8
        (raw_frame(field(0, 4, struct.pack("<d", math.nan))), "not finite"),
        (raw_frame(field(0, 4, struct.pack("<d", -math.inf))), "not finite"),
        (raw_frame(field(1, 7, sized(b'{"a":1,"a":2}'))), "duplicate"),
        (raw_frame(field(1, 7, sized(b"[NaN]"))), "malformed"),
        (raw_frame(field(1, 7, sized(b'["\xff"]'))), "malformed"),
        (raw_frame(field(1, 7, sized(b"[" * 100_000 + b"]" * 100_000))), "malformed"),
        (raw_frame(ACTION, nfds=1), "file descriptors"),
    ],
)
def test_malformed_frames_are_refused(pair, frame, match):
    a, b = pair
    threading.Thread(target=a.sendall, args=(frame,), daemon=True).start()
    with pytest.raises(FrameError, match=match):
        recv_frame(b, deadline=deadline())


# -- file descriptor caps ----------------------------------------------------------------------


def _send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])


@pytest.mark.parametrize("max_fds, sent, announced", [(0, 1, 1), (1, 3, 3), (2, 1, 0), (2, 2, 1), (4, 4, 4)])
def test_fd_caps_and_counts(pair, max_fds, sent, announced):
    a, b = pair
    pipes = [os.pipe() for _ in range(sent)]
    before = open_fds()
    try:
        head = _protocol.encode_head("result", {}, [], nfds=announced)
        _send_with_fds(a, head, [r for r, _ in pipes])
        if sent == announced and sent <= max_fds:
            frame = recv_frame(b, deadline=deadline(), limits=Limits(max_fds=max_fds))
            assert len(frame.fds) == sent
            frame.close_fds()
        else:
            with pytest.raises(FrameError, match="file descriptors"):
                recv_frame(b, deadline=deadline(), limits=Limits(max_fds=max_fds))
        # Every fd that arrived was closed: none is left open in this process.
        assert open_fds() == before
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_received_fds_are_close_on_exec(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_frame(a, "result", {}, [], fds=[r])
        frame = recv_frame(b, deadline=deadline(), limits=Limits(max_fds=1))
        assert not os.get_inheritable(frame.fds[0])
        frame.close_fds()
    finally:
        os.close(r)
        os.close(w)


def test_a_newer_peers_fields_are_skipped(pair):
    # Field numbers past the declaration: a newer peer's optional fields, ignored (no version bump).
    a, b = pair
    a.sendall(raw_frame(ACTION + field(200, 5, sized(b"new")) + field(201, 7, sized(b"[1]"))))
    assert recv_frame(b, deadline=deadline()).fields == {"action": "list"}


def test_json_fields_are_strict_ascii_json():
    head = _protocol.encode_head("ask", {"id": 1, "what": "get", "args": {"url": "m\u00e9", "n": [1, 2.5, None]}})
    body = head[_protocol.PREFIX.size :]
    number, tag, length = struct.unpack_from("<BBI", body, len(body) - len(body.split(b"\x02\x07", 1)[1]) - 2)
    text = body[-length:]
    assert (number, tag) == (2, _protocol.T_JSON) and text.isascii()
    assert json.loads(text) == {"url": "m\u00e9", "n": [1, 2.5, None]}


class CountingSocket(socket.socket):
    """A real socket that counts its reads."""

    reads = 0

    def recvmsg_into(self, *args, **kwargs):
        self.reads += 1
        return super().recvmsg_into(*args, **kwargs)


def test_a_small_frame_is_one_read_on_a_wire():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    counted = CountingSocket(fileno=b.detach())
    try:
        wire = _protocol.Wire(counted)
        send_frame(a, "returned", {"value": b"\x00" * 100}, [b"x" * 4096])
        frame = wire.receive(deadline=deadline(), limits=Limits(max_buffers=1))
        assert frame.fields["value"] == b"\x00" * 100 and frame.buffers == [b"x" * 4096]
        assert counted.reads == 1
        # An unbuffered read (a socket others read too) never takes a byte past its frame.
        send_frame(a, "exited", {"status": 1})
        send_frame(a, "exited", {"status": 2})
        assert recv_frame(counted, deadline=deadline()).fields == {"status": 1}
        assert recv_frame(counted, deadline=deadline()).fields == {"status": 2}
    finally:
        a.close()
        counted.close()


def test_a_wire_waits_on_a_blocking_socket_with_a_deadline(pair):
    a, b = pair
    b.setblocking(False)  # as a peer's shared descriptor may leave it: the wire still waits, and times out
    wire = _protocol.Wire(b)
    assert b.gettimeout() is None  # blocking: the kernel waits, with SO_RCVTIMEO
    start = time.monotonic()
    with pytest.raises(FrameTimeout):
        wire.receive(deadline=deadline(0.2))
    assert 0.15 < time.monotonic() - start < 2
    threading.Timer(0.1, send_frame, args=(a, "exited", {"status": 7})).start()
    assert wire.receive(deadline=deadline()).fields == {"status": 7}


def test_a_wire_takes_fds_with_their_frame(pair):
    # Two frames in one read, each with its fds: each frame gets its own, in order.
    a, b = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        send_frame(a, "spawned", {"pid": 1}, fds=[r1])
        send_frame(a, "spawned", {"pid": 2}, fds=[r2])
        wire = _protocol.Wire(b)
        first = wire.receive(deadline=deadline(), limits=Limits(max_fds=1))
        second = wire.receive(deadline=deadline(), limits=Limits(max_fds=1))
        os.write(w1, b"1")
        os.write(w2, b"2")
        assert (first.fields, os.read(first.fds[0], 1), second.fields, os.read(second.fds[0], 1)) == (
            {"pid": 1}, b"1", {"pid": 2}, b"2")
        first.close_fds()
        second.close_fds()
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_spinning_wire_reads_frames_and_fds_as_a_sleeping_one(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        wire = _protocol.Wire(b, spin=0.01)
        threading.Timer(0.05, send_frame, args=(a, "spawned", {"pid": 3}), kwargs={"fds": [r]}).start()
        frame = wire.receive(deadline=deadline(), limits=Limits(max_fds=1))  # past the spin: it sleeps, then reads
        assert frame.fields == {"pid": 3} and len(frame.fds) == 1
        frame.close_fds()
        send_frame(a, "exited", {"status": 1})
        assert wire.receive(deadline=deadline()).fields == {"status": 1}  # within the spin
        a.close()
        with pytest.raises(FrameEOF):
            wire.receive(deadline=deadline())
    finally:
        os.close(r)
        os.close(w)
