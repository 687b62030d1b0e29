"""Replicas (``replicas=N``) attacking each other: one model, two tenants' inputs, nothing shared.

Every replica is a fork of one loaded worker, so whatever the load made is in each of them. A
hostile model prepares at load what would join its replicas (a ``MAP_SHARED`` mapping, a pipe, a
memfd mapped shared) and, in replica A, hides the input it was given (the canary: another
tenant's secret) everywhere it can write: those, its own folder, the template's scratch; then
replica B looks everywhere it can read, signals A, and reads A's memory through ``/proc``. Each
attack is checked to have run (A reports what it wrote and B what it tried) and the canary to
hold: B finds no trace of the secret, A is still alive and serving.
"""

from __future__ import annotations

import mmap
import uuid

import pytest

import safehub
from safehub._run import memory_cgroup
from safehub._sandbox import Sandbox
from safehub._worker.sandbox import landlock
from tests.local_repos import write_repo

pytestmark = pytest.mark.timeout(180)
SANDBOX = Sandbox(timeout=60) if memory_cgroup.probe()["available"] else Sandbox(timeout=60, memory_limit=None)

HOSTILE = '''
import mmap
import os
import signal

dependencies = []


class Spy:
    def __init__(self):
        # Made at load, before the fork: every replica inherits them.
        self.shared = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)
        try:
            self.memfd = os.memfd_create("spy")
            os.ftruncate(self.memfd, 4096)
            self.memfd_map = mmap.mmap(self.memfd, 4096)
        except OSError:
            self.memfd = self.memfd_map = None  # refused where seccomp holds one address space
        self.scratch = os.getcwd()
        self.secret = None

    def hide(self, secret):
        """Replica A: the secret everywhere it can write; what worked."""
        data = secret.encode()
        self.secret = secret
        done = {"pid": os.getpid(), "folder": os.getcwd()}
        self.shared[: len(data)] = data
        done["shared"] = True
        for name, write in (("pipe", lambda: os.write(self.pipe_w, data)),
                            ("memfd", lambda: self.memfd_map.__setitem__(slice(0, len(data)), data)),
                            ("own_file", lambda: open("secret.txt", "w").write(secret)),
                            ("template_scratch", lambda: open(os.path.join(self.scratch, "secret.txt"), "w").write(secret))):
            try:
                write()
                done[name] = True
            except Exception as exc:
                done[name] = type(exc).__name__
        return done

    def look(self, folder, pid):
        """Replica B: everything it can read of A's, and a signal to A."""
        found = {"shared": bytes(self.shared[:64]).rstrip(b"\\0").decode(errors="replace"), "attribute": self.secret}
        for name, read in (("pipe", lambda: os.read(self.pipe_r, 64).decode()),
                           ("memfd", lambda: bytes(self.memfd_map[:64]).rstrip(b"\\0").decode()),
                           ("file", lambda: open(os.path.join(folder, "secret.txt")).read()),
                           ("listing", lambda: " ".join(os.listdir(folder))),
                           ("template_scratch", lambda: open(os.path.join(self.scratch, "secret.txt")).read()),
                           ("environ", lambda: open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")),
                           ("mem", lambda: _read_mem(pid)),
                           ("signal", lambda: os.kill(pid, signal.SIGKILL) or "sent")):
            try:
                found[name] = read()
            except Exception as exc:
                found[name] = "refused: " + type(exc).__name__
        return found

    def pid(self):
        return os.getpid()


def _read_mem(pid):
    with open(f"/proc/{pid}/maps") as maps:
        start = int(maps.readline().split("-")[0], 16)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        return mem.read(64).decode(errors="replace")


def spy():
    return Spy()
'''


@pytest.fixture(scope="module")
def spies(tmp_path_factory):
    repo = write_repo(tmp_path_factory.mktemp("replica-spy") / "repo", {"hubconf.py": HOSTILE})
    handle = safehub.load(str(repo), "spy", source="local", isolate=SANDBOX, returns="remote", replicas=2)
    yield handle
    handle.close()


def test_a_replica_finds_nothing_of_what_another_was_given(spies):
    a, b = spies._session.live  # the two replicas, addressed one by one
    secret = f"tenant-a-{uuid.uuid4().hex}"
    hidden = a.call("hide", (secret,), {}, inference=True)
    # The attack ran: A wrote the shared mapping, the memfd's mapping (where one could be made), its own
    # file; the pipe made at load is closed in every replica.
    assert hidden["shared"] is True and hidden["own_file"] is True and hidden["pipe"] == "OSError"
    assert hidden["memfd"] in (True, "AttributeError")
    assert hidden["template_scratch"] == "PermissionError"  # the template's scratch is read-only to a replica
    found = b.call("look", (hidden["folder"], hidden["pid"]), {}, inference=True)
    assert set(found) >= {"shared", "pipe", "memfd", "file", "listing", "environ", "mem", "signal"}
    leaks = {name: value for name, value in found.items() if value and secret in str(value)}
    assert not leaks, f"replica B read replica A's input through {sorted(leaks)}"
    # Descriptors made at load are closed in a replica; A's folder, its memory and environment are out of reach.
    assert found["pipe"].startswith("refused: OSError")
    assert found["file"] == "refused: PermissionError" and found["listing"] == "refused: PermissionError"
    assert found["environ"] == "refused: PermissionError" and found["mem"] == "refused: PermissionError"
    if landlock.abi_version() >= 6:  # Landlock's signal scope: no signal leaves a replica's domain
        assert found["signal"] == "refused: PermissionError"
    # A is alive and serving.
    assert a.call("pid", (), {}, inference=True) == hidden["pid"]


@pytest.mark.parametrize("privatize", [False, True])
def test_a_fork_shares_a_shared_mapping_until_it_is_made_private(privatize):
    """The canary above could fail: without ``privatize_shared_memory`` a fork's write reaches its parent."""
    import os

    from safehub._worker import replicas

    shared = mmap.mmap(-1, 4096)
    shared[:6] = b"parent"
    pid = os.fork()
    if pid == 0:
        try:
            if privatize:
                replicas.privatize_shared_memory()
            ok = shared[:6] == b"parent"  # the contents come along
            shared[:5] = b"child"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert shared[:6] == (b"parent" if privatize else b"childt")
