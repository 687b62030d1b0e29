"""Replies that would make the caller pay: memory the worker never held, descriptors, odd memfds.

A repository's code holds the worker's channel, so each attack forges its reply the way hostile
code would, behind the worker's back, for an isolated load (a RESULT: weights or an object) and
for a call on a remote model (a RETURNED). The canaries are measurements that could fail:

- a sparse memfd (``ftruncate``, no page written) and a hugetlb one are refused by name before a
  byte is read (before, the sparse one decoded, and reading it cost the caller its whole size);
- an inline reply streamed from a small buffer costs the caller its size once (the peak RSS of a
  child caller, ``ru_maxrss``; before, three times), and a header of millions of empty objects
  is refused before it is parsed (before, 445 MiB for 16 MiB);
- a kept result holds no descriptor (``/proc/self/fd`` counted after 48 calls);
- a malformed tensor is a ResultDecodeError, never torch's own RuntimeError; an oversized header
  is refused at once, never a wait for the call's timeout.

Every test runs on the cold and the warm path, with every sandbox layer the machine offers.
Bounded: the largest reply is 256 MiB, and a caller that regressed would peak near 1 GiB.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safehub._run import reaper, run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import ProtocolError, ResultDecodeError
from tests.local_repos import write_repo

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("worker_start")]
SANDBOX = Sandbox(timeout=60)
# A worker held to one address space (a memory_limit and no memory cgroup: SECURITY.md) may not
# call memfd_create; the attacks and results that need memfds run without a memory_limit.
UNBOUNDED = Sandbox(timeout=60, memory_limit=None)
MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]

HOSTILE = '''
    import fcntl
    import json
    import os
    import socket
    import struct
    import sys
    import time

    dependencies = []
    SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    MIB = 1024 * 1024


    def _sock():
        """The worker's channel to the parent: hostile code can reach it."""
        return sys.modules["_safehub_worker.work"].channel().sock


    def _head(kind, fields, lengths=(), nfds=0, header=None):
        """A frame's head: the worker's own encoder, or a header forged byte by byte."""
        protocol = sys.modules["_safehub_worker.protocol"]
        if header is None:
            return protocol.encode_head(kind, fields, lengths, nfds)
        prefix = struct.pack("<4sHBBHI", b"SHUB", 4, protocol.MESSAGES[kind].code, nfds, len(lengths), len(header))
        return prefix + b"".join(struct.pack("<Q", n) for n in lengths) + header


    def _json_field(number, text):
        """A header field holding JSON (tag 7): its nodes are counted before it is parsed."""
        return bytes([number, 7]) + struct.pack("<I", len(text)) + text


    def _tensor(segment, offset, code, shape):
        """A value tree of one tensor node (tag 8), by hand: dtype code 1 is F32, 8 is U8."""
        return struct.pack("<BBBIQ", 8, code, len(shape), segment, offset) + b"".join(struct.pack("<Q", d) for d in shape)


    def _send_and_linger(head, stream=(), fds=()):
        """Write a frame behind the worker's back (its buffer as chunks), then never answer."""
        print("ATTACK-RAN forged sending", flush=True)
        sock = socket.socket(fileno=os.dup(_sock().fileno()))
        sock.setblocking(True)  # whatever the worker's channel is, a dup shares it
        if fds:
            socket.send_fds(sock, [head], list(fds))
        else:
            sock.sendall(head)
        for chunk in stream:
            sock.sendall(chunk)
        time.sleep(60)


    def _sealed(fd):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd


    def _weights_head(nbytes, shape=None):
        entry = {"dtype": "U8", "shape": [nbytes] if shape is None else shape, "data_offsets": [0, nbytes]}
        body = json.dumps({"x": entry}).encode()
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body


    def _memfd(case, nbytes, weights):
        """A sealed memfd of ``nbytes`` (after a weights header), as ``case`` makes it."""
        head = _weights_head(nbytes) if weights else b""
        flags = os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if case == "hugetlb" else 0)
        fd = os.memfd_create("forged", flags)
        size = len(head) + nbytes
        if case == "hugetlb":
            size = -(-size // (2 * MIB)) * 2 * MIB  # whole huge pages
        os.ftruncate(fd, size)  # sparse: no page of it is written (but the header's)
        if head and case != "hugetlb":
            os.pwrite(fd, head, 0)
        return _sealed(fd)


    def _stream(nbytes, weights):
        """``nbytes`` (after a weights header) from one 1 MiB buffer: the worker holds 1 MiB."""
        chunk = bytes(MIB)
        if weights:
            yield _weights_head(nbytes)
        for _ in range(nbytes // MIB):
            yield chunk


    def _empty_objects(nbytes):
        """About ``nbytes`` of a JSON list of empty objects: 3 bytes each, ~80 to a parser."""
        return b"[" + b"{}," * (nbytes // 3 - 1) + b"{}]"


    def forge_result(case, nbytes=0):
        """An isolated load's RESULT, forged."""
        weights = {"action": "load", "returns": "weights"}
        if case in ("sparse", "hugetlb"):
            fd = _memfd(case, nbytes, weights=True)
            size = os.fstat(fd).st_size
            _send_and_linger(_head("result", {**weights, "transport": "memfd", "sizes": [size]}, nfds=1), fds=[fd])
        if case == "inline_announced":  # a length, and nothing after it
            _send_and_linger(_head("result", {**weights, "transport": "inline", "sizes": [nbytes]}, [nbytes]))
        if case == "inline":
            size = len(_weights_head(nbytes)) + nbytes
            _send_and_linger(_head("result", {**weights, "transport": "inline", "sizes": [size]}, [size]), _stream(nbytes, True))
        if case == "weights_header_nodes":
            body = b'{"x":' + _empty_objects(nbytes) + b"}"
            body += b" " * (-len(body) % 8)
            blob = struct.pack("<Q", len(body)) + body
            _send_and_linger(_head("result", {**weights, "transport": "inline", "sizes": [len(blob)]}, [len(blob)]), [blob])
        if case == "header_nodes":
            header = bytes([0, 5]) + struct.pack("<I", 4) + b"load" + _json_field(1, _empty_objects(nbytes))
            _send_and_linger(_head("result", {}, header=header))
        if case == "header_too_long":
            _send_and_linger(_head("result", {}, header=b" " * nbytes))
        if case == "empty_with_overflowing_shape":
            blob = _weights_head(0, shape=[0, 2**62, 2**62])
            _send_and_linger(_head("result", {**weights, "transport": "inline", "sizes": [len(blob)]}, [len(blob)]), [blob])
        raise ValueError(case)


    def tensors(n, numel):
        import torch
        return {str(i): torch.full((numel,), float(i)) for i in range(n)}


    class Hostile:
        def tensors(self, n, numel):
            return tensors(n, numel)

        def forge(self, case, nbytes=0):
            """A RETURNED, forged."""
            if case in ("sparse", "hugetlb"):
                fd = _memfd(case, nbytes, weights=False)
                _send_and_linger(_head("returned", {"value": _tensor(0, 0, 8, [nbytes])}, nfds=1), fds=[fd])
            if case == "inline_announced":
                _send_and_linger(_head("returned", {"value": _tensor(0, 0, 8, [nbytes])}, [nbytes]))
            if case == "inline":
                _send_and_linger(_head("returned", {"value": _tensor(0, 0, 8, [nbytes])}, [nbytes]), _stream(nbytes, False))
            if case == "header_nodes":
                header = bytes([0, 0]) + _json_field(2, _empty_objects(nbytes))  # value None, sizes: JSON
                _send_and_linger(_head("returned", {}, header=header))
            if case == "header_too_long":
                _send_and_linger(_head("returned", {}, header=b" " * nbytes))
            if case == "empty_with_overflowing_shape":
                _send_and_linger(_head("returned", {"value": _tensor(0, 0, 1, [0, 2**62, 2**62])}, [0]))
            raise ValueError(case)


    def hostile():
        return Hostile()
'''

# What a child caller runs: one benign call first (so the machinery's own memory is in the
# baseline), then the forged one; it prints its peak RSS before and after, and the outcome.
CHILD = r'''
import json, resource, sys
import torch
from safehub._run import reaper, run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import SafeHubError

repo, mode, case, nbytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sandbox = Sandbox(timeout=60)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
remote = None
if mode == "remote":
    remote = run_isolated(repo, "load", model="hostile", returns="remote", sandbox=sandbox)
    remote.tensors(2, 16)
else:
    run_isolated(repo, "load", model="tensors", args=(2, 16), returns="weights", sandbox=sandbox)
before = peak()
try:
    if remote is not None:
        result = remote.forge(case, nbytes)
    else:
        result = run_isolated(repo, "load", model="forge_result", args=(case, nbytes), returns="weights", sandbox=sandbox)
    outcome = "accepted"
except SafeHubError as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:300]}"
print(json.dumps({"before": before, "after": peak(), "outcome": outcome}))
'''


@pytest.fixture
def repo(tmp_path):
    return write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE})


def forged(repo: Path, mode: str, case: str, nbytes: int = 0, sandbox: Sandbox = SANDBOX):
    """The forged reply ``case`` to a remote call or an isolated load, in this process."""
    if mode == "remote":
        with run_isolated(repo, "load", model="hostile", returns="remote", sandbox=sandbox) as remote:
            return remote.forge(case, nbytes)
    return run_isolated(repo, "load", model="forge_result", args=(case, nbytes), returns="weights", sandbox=sandbox)


def in_child_caller(repo: Path, mode: str, case: str, nbytes: int) -> tuple[int, str]:
    """How much the forged reply raised a fresh caller's peak memory, and what the caller got."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", CHILD, str(repo), mode, case, str(nbytes)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ATTACK-RAN forged sending" in run.stdout + run.stderr, "the forged reply was never sent"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report["after"] - report["before"], report["outcome"]


# -- memory the worker never held ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_a_sparse_memfd_is_refused_before_a_byte_is_read(repo, mode):
    # 4 GiB that cost the worker one page: read, they would cost the caller 4 GiB.
    with pytest.raises(ResultDecodeError, match=r"memfd is sparse \((0|4096) of its 42949[0-9]* bytes allocated\)"):
        forged(repo, mode, "sparse", 4 * 1024 * MIB, UNBOUNDED)


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_a_hugetlb_memfd_is_refused_by_name(repo, mode):
    # Mapped, it fails in the caller (ENOMEM: no huge pages here), or takes from the machine's pool.
    with pytest.raises(ResultDecodeError, match=r"hugetlb memfd \(MFD_HUGETLB\)"):
        forged(repo, mode, "hugetlb", 2 * MIB, UNBOUNDED)


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_an_inline_reply_larger_than_the_worker_could_hold_is_refused_from_its_length(repo, mode):
    # A worker of 1 GiB announces 1 GiB + 1 inline: refused before a byte of it is read.
    sandbox = Sandbox(timeout=60, memory_limit=1024 * MIB)
    with pytest.raises(ProtocolError, match="buffer of 1073741825 bytes, more than the cap of 1073741824"):
        forged(repo, mode, "inline_announced", 1024 * MIB + 1, sandbox)


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_an_inline_reply_costs_the_caller_its_size_once(repo, mode):
    # 256 MiB streamed from a 1 MiB buffer: received straight into their final place, the
    # caller's peak grows by them once (before: a copy in the frame reader, another in the decoder).
    size = 256 * MIB
    grown, outcome = in_child_caller(repo, mode, "inline", size)
    assert outcome == "accepted"
    assert grown < 1.4 * size, f"the caller's peak grew by {grown / MIB:.0f} MiB for a {size // MIB} MiB reply"


@pytest.mark.parametrize("mode, case", [("call", "header_nodes"), ("call", "weights_header_nodes"), ("remote", "header_nodes")])
def test_a_header_of_millions_of_nodes_is_refused_before_it_is_parsed(repo, mode, case):
    # 3.9 MiB (under the call's 4 MiB cap) or 16 MiB of "{}," parse to ~80 bytes a node: before
    # the node cap, 16 MiB cost the caller 445 MiB.
    size = 16 * MIB - 4096 if mode == "remote" or case == "weights_header_nodes" else 4 * MIB - 4096
    grown, outcome = in_child_caller(repo, mode, case, size)
    assert "JSON nodes, more than the cap" in outcome, outcome
    assert grown < 3 * size + 16 * MIB, f"the caller's peak grew by {grown / MIB:.0f} MiB for a {size // MIB} MiB header"


# -- descriptors -------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def memfd_mappings() -> int:
    """Mappings of the worker's memfds in this process: the kept results did come in memfds."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:safehub-" in line for line in maps)


def test_kept_results_of_a_remote_model_hold_no_descriptor(repo):
    with run_isolated(repo, "load", model="hostile", returns="remote", sandbox=UNBOUNDED) as remote:
        remote.tensors(8, 64 * 1024)  # the first call's one-time descriptors (threads, caches)
        before = open_fds()
        # 8 tensors of 256 KiB each: past the inline size, so they come in memfds.
        kept = [remote.tensors(8, 64 * 1024) for _ in range(48)]
        after = open_fds()
        assert memfd_mappings() >= 48
    assert [float(t[0]) for t in kept[-1].values()] == [float(i) for i in range(8)]
    assert after == before, f"48 kept results hold {len(after - before)} descriptors"


def test_kept_weights_results_hold_no_descriptor(repo):
    run_isolated(repo, "load", model="tensors", args=(8, 64 * 1024), returns="weights", sandbox=UNBOUNDED)
    reaper.drain()  # the workers' ends (their pipes and sockets) run in the background
    before = open_fds()
    kept = [run_isolated(repo, "load", model="tensors", args=(8, 64 * 1024), returns="weights", sandbox=UNBOUNDED)
            for _ in range(4)]
    gc.collect()  # nothing but the kept results may hold anything
    reaper.drain()
    after = open_fds()
    assert memfd_mappings() >= 4
    assert [float(t[0]) for t in kept[-1].values()] == [float(i) for i in range(8)]
    assert after == before, f"4 kept results hold {len(after - before)} descriptors"


# -- malformed replies fail at once, as protocol errors ----------------------------------------


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_an_empty_tensor_with_overflowing_strides_is_a_decode_error(repo, mode):
    with pytest.raises(ResultDecodeError, match="cannot be built|could not be built"):
        forged(repo, mode, "empty_with_overflowing_shape")


@pytest.mark.parametrize("mode", ["call", "remote"])
def test_an_oversized_header_is_refused_at_once(repo, mode):
    # Past the cap (4 MiB for a call, 16 MiB for a remote reply): refused from its length, unread,
    # with the worker still sending; never a wait for the 60 s timeout.
    with pytest.raises(ProtocolError, match="more than the cap"):
        forged(repo, mode, "header_too_long", 16 * MIB + 1)
