"""The parent<->worker frame format: golden bytes, round trips, and every way a peer can misbehave."""

from __future__ import annotations

import json
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


def raw_frame(header: bytes, buffers: list[bytes] = (), *, magic=b"SHUB", version=3, nbuf=None) -> bytes:
    nbuf = len(buffers) if nbuf is None else nbuf
    lengths = b"".join(struct.pack(">Q", len(b)) for b in buffers)
    return struct.pack(">4sHHI", magic, version, nbuf, len(header)) + lengths + header + b"".join(buffers)


# -- golden bytes ------------------------------------------------------------------------------


GOLDEN_HEAD = (
    b"SHUB"  # magic
    b"\x00\x03"  # PROTOCOL_VERSION
    b"\x00\x01"  # one buffer
    b"\x00\x00\x00\x35"  # header length (53)
    b"\x00\x00\x00\x00\x00\x00\x00\x03"  # the buffer's length
    b'{"v":3,"kind":"result","action":"list","names":["a"]}'
)


def test_golden_head_bytes():
    assert _protocol.PROTOCOL_VERSION == 3
    head = _protocol.encode_head("result", {"action": "list", "names": ["a"]}, [3])
    assert head == GOLDEN_HEAD


def test_golden_frame_decodes(pair):
    a, b = pair
    a.sendall(GOLDEN_HEAD + b"xyz")
    frame = recv_frame(b, deadline=deadline())
    assert (frame.kind, frame.fields, frame.buffers, frame.fds) == ("result", {"action": "list", "names": ["a"]}, [b"xyz"], [])


def test_fds_field_only_when_fds_are_sent():
    head = _protocol.encode_head("result", {}, [], nfds=2)
    assert head.endswith(b'{"v":3,"kind":"result","fds":2}')


def test_reserved_fields_are_refused():
    with pytest.raises(ValueError):
        _protocol.encode_head("result", {"kind": "x"})


# -- round trips -------------------------------------------------------------------------------


def test_round_trip_with_buffers(pair):
    a, b = pair
    buffers = [b"", b"\x00" * 10, os.urandom(3 * 1024 * 1024)]
    fields = {"text": "h\u00e9llo \u2603", "n": 3, "nested": {"l": [1, None, True]}}
    thread = threading.Thread(target=send_frame, args=(a, "call", fields, buffers), kwargs={"deadline": deadline()})
    thread.start()
    frame = recv_frame(b, deadline=deadline(), limits=Limits(max_buffer_bytes=4 << 20, max_total_bytes=8 << 20))
    thread.join()
    assert frame.kind == "call" and frame.fields == fields and [bytes(b) for b in frame.buffers] == buffers
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
    body = b'{"v":3,"kind":"call","x":[' + b"{}," * 999 + b"{}]}"
    a.sendall(_protocol.PREFIX.pack(_protocol.MAGIC, _protocol.PROTOCOL_VERSION, 0, len(body)) + body)
    with pytest.raises(FrameError, match="a header of 2004 JSON nodes, more than the cap of 1000 nodes"):
        recv_frame(b, deadline=deadline(), limits=Limits(max_header_nodes=1000))


def test_count_nodes_bounds_the_values_of_a_json_text():
    assert _protocol.count_nodes(b'{"v":3,"kind":"x"}') == 3  # the object, two values (keys not counted)
    assert _protocol.count_nodes(b"[[],{},1]") == 6  # 4 values: each container counts its own bracket
    assert _protocol.count_nodes(b'"a,b,c"') == 3  # commas in strings: an upper bound only


def test_round_trip_with_fds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_frame(a, "result", {"x": 1}, [b"data"], fds=[r], deadline=deadline())
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
        send_frame(a, "result", {"i": i}, [bytes([i]) * i])
    for i in range(3):
        frame = recv_frame(b, deadline=deadline())
        assert frame.fields == {"i": i} and frame.buffers == [bytes([i]) * i]


# -- short reads, EOF, timeouts ----------------------------------------------------------------


def test_short_reads_are_reassembled(pair):
    a, b = pair
    data = _protocol.encode_head("result", {"k": "v" * 50}, [5]) + b"12345"

    def trickle():
        for i in range(len(data)):
            a.send(data[i : i + 1])
            if i % 7 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=trickle)
    thread.start()
    frame = recv_frame(b, deadline=deadline())
    thread.join()
    assert frame.fields == {"k": "v" * 50} and frame.buffers == [b"12345"]


@pytest.mark.parametrize("cut", [0, 3, 12, 20, 40])
def test_early_eof_anywhere_is_a_clear_error(pair, cut):
    a, b = pair
    data = _protocol.encode_head("result", {"k": "v"}, [8]) + b"12345678"
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
        (struct.pack(">4sHHI", b"SHUB", 3, 0, 0xFFFFFFFF), "header of 4294967295 bytes"),
        (struct.pack(">4sHHI", b"SHUB", 3, 0xFFFF, 2), "65535 buffers"),
        (struct.pack(">4sHHI", b"SHUB", 3, 1, 2) + struct.pack(">Q", 2**64 - 1), "buffer of"),
        (struct.pack(">4sHHI", b"SHUB", 3, 2, 2) + struct.pack(">QQ", 60 << 20, 60 << 20), "total"),
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
    a.sendall(raw_frame(b'{"v":3,"kind":"result"}', nbuf=1)[:12] + struct.pack(">Q", 50 << 20) + b'{"v":3,"kind":"result"}')
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


@pytest.mark.parametrize(
    "frame, match",
    [
        (raw_frame(b'{"v":3,"kind":"result"}', magic=b"HTTP"), "magic"),
        (raw_frame(b'{"v":1,"kind":"result"}', version=1), "version 1"),  # version 1 frames: refused
        (raw_frame(b'{"v":2,"kind":"result"}', version=2), "version 2"),  # so are version 2 frames
        (raw_frame(b'{"v":1,"kind":"result"}'), "header version 1"),
        (raw_frame(b'{"v":true,"kind":"result"}'), "header version"),
        (raw_frame(b'{"kind":"result"}'), "header version"),
        (raw_frame(b'{"v":3}'), "kind"),
        (raw_frame(b'{"v":3,"kind":7}'), "kind"),
        (raw_frame(b'{"v":3,"kind":"result"'), "malformed"),
        (raw_frame(b"[1, 2]"), "not a JSON object"),
        (raw_frame(b'{"v":3,"kind":"a","kind":"b"}'), "duplicate"),
        (raw_frame(b'{"v":3,"kind":"a","x":NaN}'), "malformed"),
        (raw_frame(b'{"v":3,"kind":"a","x":"\xff"}'), "malformed"),
        (raw_frame(b"[" * 100_000 + b"]" * 100_000), "malformed"),
        (raw_frame(b'{"v":3,"kind":"a","fds":"1"}'), "file descriptors"),
        (raw_frame(b'{"v":3,"kind":"a","fds":1}'), "file descriptors"),
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


def test_header_is_plain_json():
    head = _protocol.encode_head("call", {"action": "load", "model": "m\u00e9"})
    header = head[_protocol.PREFIX.size :]
    assert header.isascii()
    assert json.loads(header) == {"v": 3, "kind": "call", "action": "load", "model": "m\u00e9"}
