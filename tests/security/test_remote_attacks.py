"""Hostile remote models (``returns="remote"``): what a model in its worker can do to its caller.

The model's code holds the worker's channel (the threat this protocol is built for), so each
attack uses it the way hostile code would: forged and oversized replies behind the worker's
back, a forward that never returns, a daemon forked between calls, tampering with its input
tensors, fetches during a call (through the worker's channel and as raw frames), a forged answer
to the load. Each test checks that the attack ran (the parent received the forged frame: the
error names its defect; the daemon was seen alive; the worker reports its own changes) and that
its canary holds: nothing unpickled here (a canary file a pickle would create), the caller's
tensors unchanged, no fetch handler called, no process left, and a worker that broke the
protocol ended, with every later call saying why. Every test runs on the cold and the warm path,
with every sandbox layer the machine offers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from safehub._run import memory_cgroup, run_isolated
from safehub._run.session import FETCH_REFUSED
from safehub._sandbox import Sandbox
from safehub.errors import ProtocolError, RemoteClosedError, SandboxLimitError, WorkerTimeoutError
from tests.local_repos import write_repo
from tests.process_trees import all_gone, tree_of

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("worker_start")]
SANDBOX = Sandbox(timeout=60)
UNBOUNDED = Sandbox(timeout=60, memory_limit=None)

HOSTILE = '''
    import json
    import os
    import pickle
    import socket
    import struct
    import sys
    import threading
    import time

    dependencies = []
    FORK_REFUSED = []


    def _sock():
        """The worker's channel to the parent: hostile code can reach it."""
        return sys.modules["_safehub_worker.work"].channel().sock


    def _frame(fields, buffers=(), nfds=0, kind="returned", version=4):
        """A frame by the worker's own encoder (its version forged on demand); the trees in it by hand."""
        head = sys.modules["_safehub_worker.protocol"].encode_head(kind, fields, [len(b) for b in buffers], nfds)
        return head[:4] + struct.pack("<H", version) + head[6:] + b"".join(buffers)


    def _tensor(segment, offset, code, shape):
        """A tensor node (tag 8) by hand: dtype code 1 is F32, 9 BOOL; any other byte is no dtype."""
        return struct.pack("<BBBIQ", 8, code, len(shape), segment, offset) + b"".join(struct.pack("<Q", d) for d in shape)


    def _list(*nodes, count=None):
        return struct.pack("<BI", 9, len(nodes) if count is None else count) + b"".join(nodes)


    def _send_and_linger(data, fds=()):
        """Write raw bytes behind the worker's back, then never answer: the parent must act alone."""
        sock = socket.socket(fileno=os.dup(_sock().fileno()))
        sock.setblocking(True)  # whatever the worker's channel is, a dup shares it
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
        time.sleep(60)


    class Canary:
        """Unpickling this anywhere creates the canary file: the parent must never do it."""

        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('the parent ran my pickle')" % self.path,))


    def _sealed(data):
        import fcntl
        fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return fd


    class Hostile:
        def __call__(self, x):
            return x

        def echo(self, value):
            return value

        def forge(self, case, canary):
            pickled = pickle.dumps(Canary(canary))
            f32 = struct.pack("<4f", 1, 2, 3, 4)
            if case == "pickle_node":
                _send_and_linger(_frame({"value": bytes([13]) + pickled}, [pickled]))
            if case == "pickle_dtype":
                _send_and_linger(_frame({"value": _tensor(0, 0, 200, [len(pickled)])}, [pickled]))
            if case == "tensor_outside_segment":
                _send_and_linger(_frame({"value": _tensor(0, 0, 1, [1 << 20])}, [f32]))
            if case == "missing_segment":
                _send_and_linger(_frame({"value": _tensor(3, 0, 1, [4])}, [f32]))
            if case == "overlapping_tensors":
                node = _tensor(0, 0, 1, [4])
                _send_and_linger(_frame({"value": _list(node, node)}, [f32]))
            if case == "shape_overflow":
                _send_and_linger(_frame({"value": _tensor(0, 0, 1, [2**62, 2**62, 4])}, [f32]))
            if case == "bool_bytes":
                _send_and_linger(_frame({"value": _tensor(0, 0, 9, [4])}, [bytes([0, 1, 2, 1])]))
            if case == "unsealed_memfd":
                fd = os.memfd_create("unsealed")
                os.write(fd, f32)  # no seals: it could change after the parent checked it
                _send_and_linger(_frame({"value": _tensor(0, 0, 1, [4])}, nfds=1), fds=[fd])
            if case == "too_many_fds":
                fds = [_sealed(f32) for _ in range(12)]
                _send_and_linger(_frame({"value": None}, nfds=len(fds)), fds=fds)
            if case == "deep_tree":
                tree = bytes([0])  # None
                for _ in range(200):
                    tree = _list(tree)
                _send_and_linger(_frame({"value": tree}))
            if case == "node_flood":
                _send_and_linger(_frame({"value": _list(*[bytes([0])] * 2_000_000)}))  # 2 MB of None nodes
            if case == "count_flood":  # a list announcing 4 billion items in 5 bytes
                _send_and_linger(_frame({"value": _list(count=2**32 - 1)}))
            if case == "header_length_absurd":
                _send_and_linger(struct.pack("<4sHBBHI", b"SHUB", 4, 8, 0, 0, 0xFFFFFFFF) + pickled)
            if case == "buffer_length_absurd":
                body = bytes([0, 0])  # value: None
                _send_and_linger(struct.pack("<4sHBBHI", b"SHUB", 4, 8, 0, 1, len(body)) + struct.pack("<Q", 2**60) + body)
            if case == "wrong_kind":
                _send_and_linger(_frame({"action": "load", "returns": "object", "transport": "inline",
                                         "sizes": [len(pickled)]}, [pickled], kind="result"))
            if case == "weights_for_a_call":
                _send_and_linger(_frame({"value": None, "transport": "inline", "sizes": [len(pickled)]}, [pickled]))
            if case == "old_version":
                _send_and_linger(_frame({"value": None}, version=3))
            raise ValueError(case)

        def spin(self):
            print("ATTACK-RAN spin", flush=True)
            while True:
                pass

        def plant_daemon(self, comm):
            """Return at once; a moment later, between calls, a double-forked daemon appears."""
            def later():
                import ctypes
                time.sleep(0.3)
                try:
                    pid = os.fork()
                except OSError as exc:  # one address space (no memory cgroup here): refused
                    FORK_REFUSED.append(str(exc))
                    return
                if pid == 0:
                    os.setsid()
                    if os.fork() == 0:
                        ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)  # PR_SET_NAME: findable
                        for fd in (0, 1, 2):
                            os.close(fd)
                        time.sleep(30)  # bounded: ends by itself even if nothing kills it
                    os._exit(0)
            threading.Thread(target=later, daemon=True).start()
            return "planted"

        def hoard(self, kind):
            """1.5 GiB in 64 MiB steps: memfds written and never mapped, or files in the scratch."""
            chunk, written, kept = b"x" * (64 << 20), 0, []
            try:
                for i in range(24):
                    if kind == "memfds":
                        if i % 4 == 0:
                            kept.append(os.memfd_create(f"hoard-{i}"))
                        os.pwrite(kept[-1], chunk, (i % 4) * len(chunk))
                    else:
                        with open(f"hoard-{i:02d}.bin", "wb") as f:
                            f.write(chunk)
                    written += 64
            except OSError as exc:
                return f"denied after {written} MiB: {exc}"
            return f"got {written} MiB"

        def fork_refused(self):
            return FORK_REFUSED[0] if FORK_REFUSED else None

        def tamper(self, x):
            """Everything a model can try against the tensors it was given."""
            import ctypes
            tried = {}
            x.add_(1)  # its own copy
            tried["in_place"] = float(x.reshape(-1)[0])
            mapped = [line.split()[0] for line in open("/proc/self/maps") if "memfd:" in line]
            tried["memfds_mapped"] = len(mapped)
            for span in mapped:
                try:
                    fd = os.open(f"/proc/self/map_files/{span}", os.O_RDWR)
                    try:
                        tried["write_through_map_files"] = os.pwrite(fd, b"PWNED", 0)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    tried["write_through_map_files"] = f"denied: {exc.strerror}"
            ctypes.memset(x.data_ptr(), 0x7F, 4)  # straight into the memory it sees
            return {"tried": tried, "x": x}

        def fetch(self, url):
            """Ask the parent to fetch, as the fetch shims would."""
            try:
                return {"answer": sys.modules["_safehub_worker.work"].channel().ask("fetch", {"url": url})[0]}
            except Exception as exc:
                return {"refused": f"{type(exc).__name__}: {exc}"}

        def raw_fetch(self, url):
            """Ask with a raw frame, bypassing the worker's own channel object."""
            proto = sys.modules["_safehub_worker.protocol"]
            sock = _sock()
            proto.send_frame(sock, "ask", {"id": 77, "what": "fetch", "args": {"url": url}})
            answer = proto.recv_frame(sock, deadline=time.monotonic() + 10)
            return {"kind": answer.kind, **answer.fields}

        def ask_flood(self):
            proto = sys.modules["_safehub_worker.protocol"]
            sock = _sock()
            for i in range(100_000):
                proto.send_frame(sock, "ask", {"id": i, "what": "fetch", "args": {}})
                proto.recv_frame(sock, deadline=time.monotonic() + 10)


    def hostile(fetch_url=None):
        if fetch_url is not None:  # during the load, fetches may be served (issue 10's broker)
            value = sys.modules["_safehub_worker.work"].channel().ask("fetch", {"url": fetch_url})[0]
            print("ATTACK-RAN load-time fetch answered", value, flush=True)
        return Hostile()


    def forged_ready(canary):
        """Answer the load itself with a forged RESULT: methods that are not names."""
        _send_and_linger(_frame({"action": "load", "returns": "remote", "methods": [1, 2]}, kind="result"))
'''


@pytest.fixture
def repo(tmp_path):
    return write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE})


def load(repo: Path, sandbox: Sandbox = SANDBOX, asks=None, **kwargs):
    return run_isolated(repo, "load", model="hostile", kwargs=kwargs, returns="remote", sandbox=sandbox, asks=asks)


def assert_dead(remote, processes: list[psutil.Process], why: str) -> None:
    """The worker is ended, its tree gone, and a later call says why."""
    assert remote.closed and all_gone(processes)
    with pytest.raises(RemoteClosedError, match=why):
        remote.echo(1)


FORGED = {
    "pickle_node": "unknown node tag 13",
    "pickle_dtype": "dtype code 200",
    "tensor_outside_segment": "run past segment 0",
    "missing_segment": "segment 3 of 1",
    "overlapping_tensors": "two byte ranges overlap",
    "shape_overflow": "larger than any buffer",
    "bool_bytes": "BOOL tensor's bytes must be 0 or 1",
    "unsealed_memfd": "not sealed against writes",
    "too_many_fds": "more than 8 file descriptors",
    "deep_tree": "nested deeper than 32 containers",
    "node_flood": "more than 1000000 nodes",  # counted as the tree is read
    "count_flood": "a container of 4294967295 items in 0 bytes",  # refused before a list is made
    "header_length_absurd": "more than the cap",
    "buffer_length_absurd": "more than the cap",
    "wrong_kind": "'result' frame where ask or returned or failed was expected",
    "weights_for_a_call": r"answered forge\(\) with weights",
    "old_version": "protocol version 3, expected 4",
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_reply_is_refused_unread_and_ends_the_worker(repo, tmp_path, case):
    canary = tmp_path / "pickle-canary"
    # A forged memfd needs memfd_create, which a worker held to one address space (a
    # memory_limit and no memory cgroup: SECURITY.md) may not call; those forgeries run unbounded.
    remote = load(repo, UNBOUNDED if case in ("unsealed_memfd", "too_many_fds") else SANDBOX)
    processes = tree_of(remote.pid)
    # The error names the forged frame's defect: the parent received and refused that frame.
    with pytest.raises(ProtocolError, match=FORGED[case]):
        remote.forge(case, str(canary))
    assert not canary.exists(), "the parent unpickled the worker's bytes"
    assert_dead(remote, processes, "broke the protocol during a call to forge")


def test_a_forward_that_never_returns_times_out_and_ends_the_worker(repo, capsys):
    remote = load(repo, Sandbox(timeout=2))
    processes = tree_of(remote.pid)
    with pytest.raises(WorkerTimeoutError, match="time limit of 2 s"):
        remote.spin()
    assert "ATTACK-RAN spin" in wait_for_output(capsys, "ATTACK-RAN spin")
    assert_dead(remote, processes, r"a call to spin\(\) ran past its time limit of 2 s")


def wait_for_output(capsys, marker: str, timeout: float = 10.0) -> str:
    seen = ""
    end = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < end:
        seen += capsys.readouterr().out
        time.sleep(0.05)
    return seen


def processes_named(comm: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "status"])
            if p.info["name"] == comm and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_a_daemon_forked_between_calls_dies_with_the_handle(repo):
    comm = "shd-" + uuid.uuid4().hex[:11]
    remote = load(repo)
    try:
        assert remote.plant_daemon(comm) == "planted"
        end = time.monotonic() + 20
        while not processes_named(comm) and time.monotonic() < end:
            if not memory_cgroup.probe()["available"] and remote.fork_refused():
                # No memory cgroup: the worker is one address space, and the fork never happens.
                assert "Operation not permitted" in remote.fork_refused()
                remote.close()
                assert not processes_named(comm)
                return
            time.sleep(0.05)
        (daemon,) = processes_named(comm)  # the attack ran: the daemon is up, between calls
        assert remote.pid in {p.pid for p in daemon.parents()}  # still inside the worker's tree
        assert remote.echo("still answering") == "still answering"
        remote.close()
        assert all_gone([daemon]) and not processes_named(comm)
    finally:
        for proc in processes_named(comm):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.mark.parametrize("kind", ["memfds", "scratch"])
def test_memory_a_model_hoards_is_bounded_by_memory_limit(repo, kind):
    remote = load(repo, Sandbox(timeout=60, memory_limit=1 << 30))
    try:
        answer = remote.hoard(kind)
    except SandboxLimitError as exc:  # a memory cgroup: the kernel ended the sandbox at the limit
        assert exc.limit == "memory_limit" and exc.value == 1 << 30
        assert "memory limit of 1 GiB was hit" in str(exc)
        assert remote.closed
        return
    finally:
        remote.close()
    # No memory cgroup: memfd_create refused, the scratch tmpfs a quarter of memory_limit.
    assert answer.startswith("denied after "), answer
    assert int(answer.split()[2]) <= 1024, answer


@pytest.mark.parametrize("size", [4, 100_000], ids=["inline", "memfd"])
def test_the_model_cannot_change_the_callers_tensor(repo, size):
    x = torch.arange(size, dtype=torch.float32)
    original = x.clone()
    remote = load(repo)
    try:
        got = remote.tamper(x)
        tried = got["tried"]
        assert tried["in_place"] == 1.0 and float(got["x"][1]) == 2.0  # the attack ran, on its own copy
        if size > 4:  # the input came in a memfd, which the model tried to write through
            assert tried["memfds_mapped"] >= 1 and tried["write_through_map_files"].startswith("denied"), tried
        assert torch.equal(x, original)  # the canary: the caller's tensor as it was
        assert torch.equal(remote(x), original)  # and the next call gets it intact too
    finally:
        remote.close()


class FetchCanary:
    """A fetch handler of the parent, and a loopback listener a URL could point at: both must stay untouched."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/leak?input=SECRET-INPUT"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def handler(self, args: dict):
        self.calls.append(args)
        return "served", [], []

    def _accept(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.listener.accept()
                self.connections += 1
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def fetch_canary():
    canary = FetchCanary()
    yield canary
    canary.close()


def test_a_call_cannot_fetch(repo, fetch_canary, capsys):
    # The load may fetch: the handler serves it (so it was live), then no call may.
    remote = load(repo, asks={"fetch": fetch_canary.handler}, fetch_url="http://example.invalid/weights.pt")
    try:
        assert "load-time fetch answered served" in wait_for_output(capsys, "load-time fetch answered")
        assert len(fetch_canary.calls) == 1
        through_channel = remote.fetch(fetch_canary.url)
        raw = remote.raw_fetch(fetch_canary.url)
        # The attacks ran and got the parent's refusal, nothing else.
        assert through_channel == {"refused": f"Refused: {FETCH_REFUSED}"}
        assert raw == {"kind": "refuse", "id": 77, "reason": FETCH_REFUSED}
        assert len(fetch_canary.calls) == 1 and fetch_canary.connections == 0
        assert remote.echo("after") == "after"
    finally:
        remote.close()


def test_a_worker_asking_without_end_is_cut_off(repo, fetch_canary):
    remote = load(repo, asks={"fetch": fetch_canary.handler})
    processes = tree_of(remote.pid)
    with pytest.raises(ProtocolError, match="more than 1000 questions"):
        remote.ask_flood()
    assert fetch_canary.calls == []
    assert_dead(remote, processes, "broke the protocol during a call to ask_flood")


def test_a_forged_answer_to_the_load_gives_no_handle(repo, tmp_path):
    with pytest.raises(ProtocolError, match="list of methods"):
        run_isolated(repo, "load", model="forged_ready", args=(str(tmp_path / "canary"),), returns="remote", sandbox=SANDBOX)
    from safehub._run import session

    assert not session._open  # no handle was made, and the worker was cleaned up with the call
