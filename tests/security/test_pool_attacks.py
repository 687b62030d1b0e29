"""Hostile remote models against the session's pools (``safehub/_run/pools.py``, SECURITY.md).

The model's code runs in the worker's process, so it holds everything the worker holds: the
input pool's descriptor (a dup inside each mapping of it), the worker's writable mapping of the
result pool, the module that builds each reply. Each attack uses them as hostile code would and
checks its canary: the bytes the caller wrote into its input pool, a result the caller already
holds, a claim about the result pool refused before a byte of it is read (and the worker
ended), the caller's memory bounded by the pool however the worker claims it. Every test runs
on the cold and the warm path, with every sandbox layer the machine offers.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from safehub._run import pools, run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import RemoteClosedError, ResultDecodeError
from tests.local_repos import write_repo
from tests.process_trees import all_gone, tree_of

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("worker_start")]
SANDBOX = Sandbox(timeout=60)
MIB = 1024 * 1024
N = MIB // 4  # floats in 1 MiB: past the inline size, so results take the pool

HOSTILE = '''
    import ctypes
    import errno
    import mmap
    import os
    import sys
    import threading
    import time

    import torch

    dependencies = ["torch"]
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    MADV_REMOVE = 9


    def _worker(name):
        return sys.modules["_safehub_worker." + name]


    def _memfds(name):
        """This process's descriptors of the memfd ``name``: hostile code finds them in /proc."""
        found = []
        for entry in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{entry}").startswith("/memfd:" + name):
                    found.append(int(entry))
            except OSError:
                pass
        return found


    def _libc_call(result):
        if result in (-1, None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "libc")
        return result


    def _try(report, what, action):
        try:
            action()
            report[what] = "done"
        except OSError as exc:
            report[what] = errno.errorcode.get(exc.errno, str(exc.errno))


    def _write_shared_read_only_mapping(fd, size):
        """Map read-only and shared, then ask for write access: mprotect must refuse."""
        address = _libc_call(_libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0))
        _libc_call(_libc.mprotect(address, size, mmap.PROT_READ | mmap.PROT_WRITE))
        ctypes.memset(address, 0x58, 16)


    def _reopen_and_write(fd):
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            os.pwrite(reopened, b"X" * 16, 0)
        finally:
            os.close(reopened)


    class Model:
        def __init__(self):
            self.scribbler = None

        def __call__(self, x):
            return x * 2

        def attack_inputs(self, x):
            """Every way to write into the caller's input pool, then the model's own view of it."""
            report = {}
            fds = _memfds("safehub-inputs")
            report["found"] = len(fds)
            for fd in fds:
                size = os.fstat(fd).st_size
                _try(report, "pwrite", lambda: os.pwrite(fd, b"X" * 16, 0))
                _try(report, "write", lambda: os.write(fd, b"X" * 16))
                _try(report, "mmap shared writable", lambda: mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                                                        prot=mmap.PROT_READ | mmap.PROT_WRITE))
                _try(report, "mprotect a read-only shared mapping", lambda: _write_shared_read_only_mapping(fd, size))
                _try(report, "reopen through /proc and write", lambda: _reopen_and_write(fd))
                _try(report, "shrink", lambda: os.ftruncate(fd, 0))
                _try(report, "grow", lambda: os.ftruncate(fd, size * 2))
                _try(report, "punch a hole", lambda: _libc_call(_libc.fallocate(fd, PUNCH_HOLE, 0, size)))
            x.fill_(-1.0)  # its own copy-on-write pages: allowed, and seen by nobody else
            report["own view written"] = float(x[0]) == -1.0
            return report

        def scribble(self, n):
            """Return ones; then, once told, write 0xff into the result pool for as long as it can."""
            view = _worker("pools")._result_pool[2]
            state = {"go": threading.Event(), "stop": False, "writes": 0}

            def run():
                state["go"].wait()
                while not state["stop"]:
                    view[: n * 4] = b"\\xff" * (n * 4)
                    state["writes"] += 1

            threading.Thread(target=run, daemon=True).start()
            self.scribbler = state
            return torch.ones(n)

        def scribble_now(self, writes):
            """Let the scribbler go (the caller holds the result by now) and wait for its writes."""
            state = self.scribbler
            state["go"].set()
            while state["writes"] < writes:
                time.sleep(0.001)
            return state["writes"]

        def lie(self, case, n):
            """A real result with a forged RETURNED: the reply's own builder, replaced for one call."""
            remote = _worker("remote")
            honest = remote._returned
            pool = _worker("pools")._result_pool

            def forged(packed):
                remote._returned = honest
                kind, fields, buffers, fds = honest(packed)
                size = len(pool[2]) if pool else 0
                if case == "past_the_pool":
                    fields["pooled"] = size + 1
                if case == "negative":
                    fields["pooled"] = -1
                if case == "short":
                    fields["pooled"] = 64  # the tensor's bytes run past it
                if case == "without_a_pool":
                    fields["pooled"] = 4096
                if case == "sparse":
                    pool[1].madvise(MADV_REMOVE, 0, size)  # every page of the pool freed: holes
                    fields["pooled"] = size
                if case == "whole_pool_for_a_tiny_result":
                    fields["pooled"] = size
                return kind, fields, buffers, fds

            remote._returned = forged
            return torch.ones(n)


    def model():
        return Model()
'''


@pytest.fixture
def repo(tmp_path) -> Path:
    return write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE})


def load(repo: Path, sandbox: Sandbox = SANDBOX):
    return run_isolated(repo, "load", model="model", returns="remote", sandbox=sandbox)


def with_result_pool(remote) -> pools.ResultPool:
    """Make the result pool (a large result first comes another way), and return it."""
    remote(torch.zeros(N))
    results = remote._session.pools.results
    assert results.size >= MIB
    return results


def test_the_model_cannot_write_into_the_callers_input_pool(repo):
    x = torch.arange(N, dtype=torch.float32)
    refused = {"EPERM", "EACCES"}
    with load(repo) as remote:
        report = remote.attack_inputs(x)
        inputs = remote._session.pools.inputs.memfd
        # The canary: the bytes the caller wrote into its pool, and its own tensor.
        assert bytes(inputs.view[: x.nbytes]) == x.numpy().tobytes()
        assert os.fstat(inputs.fd).st_size == inputs.size and os.fstat(inputs.fd).st_blocks * 512 >= inputs.size
    assert torch.equal(x, torch.arange(N, dtype=torch.float32))
    assert report.pop("found") >= 1, "the attack found no descriptor of the input pool"
    assert report.pop("own view written") is True  # the attack ran in the model's own view
    assert {what: outcome for what, outcome in report.items() if outcome not in refused} == {}


def test_the_model_cannot_change_a_result_the_caller_holds(repo):
    with load(repo) as remote:
        results = with_result_pool(remote)
        held = remote.scribble(N)
        assert remote.scribble_now(50) >= 50  # written 50 times after the caller got ``held``
        # The attack reached the shared pool...
        assert os.pread(results.fd, 16, 0) == b"\xff" * 16
        # ...and not the caller's copy.
        assert torch.equal(held, torch.ones(N))
        again = remote(torch.ones(N))  # the next result, copied while the worker still scribbles
        assert again.shape == (N,)
    assert torch.equal(held, torch.ones(N))


LIES = {
    "past_the_pool": r"claims \d+ bytes of a result pool of \d+",
    "negative": "claims -1 bytes of a result pool",
    "short": "run past segment 0",
    "without_a_pool": "uses a result pool it was not given",
    "sparse": "result pool is sparse",
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_a_lie_about_the_result_pool_is_refused_and_ends_the_worker(repo, case):
    with load(repo) as remote:
        if case != "without_a_pool":
            with_result_pool(remote)
        processes = tree_of(remote.pid)
        with pytest.raises(ResultDecodeError, match=LIES[case]):
            remote.lie(case, N)
        assert remote.closed and all_gone(processes)
        with pytest.raises(RemoteClosedError):
            remote(torch.ones(4))


def test_claiming_the_whole_pool_costs_the_caller_one_region_at_most(repo):
    with load(repo) as remote:
        results = with_result_pool(remote)
        for _ in range(20):
            out = remote.lie("whole_pool_for_a_tiny_result", 16)
            assert torch.equal(out, torch.ones(16))  # small: inline; the claim only costs a copy
            del out
            gc.collect()
        # Each claim cost one region of the pool's size, reused; the pool never grew.
        assert len(results.free) == 1 and len(results.free[0]) == results.size
