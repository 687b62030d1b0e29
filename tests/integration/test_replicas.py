"""Replicas (``returns="remote", replicas=N``): one model, N sandboxed forks of its loaded worker.

Real workers: outputs equal to in-process from several threads at once, each replica its own
sandboxed process (distinct pid, seccomp, no_new_privs, the unprivileged uid, its own memory
cgroup where cgroups are used), a busy replica leaving calls to the others, a killed replica
failing only its own call, ``close()`` leaving no process. One replica set per module where a test
does not end replicas. Where the machine gives no memory cgroup (the unprivileged run), replicas
are refused for a ``memory_limit`` and served with ``memory_limit=None``. The attacks one replica
tries on another are in ``tests/security/test_replica_attacks.py``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import safehub
from safehub._run import memory_cgroup, warm
from safehub._sandbox import Sandbox
from safehub.errors import InvalidArgumentError, RemoteClosedError, SandboxError, WorkerCrashedError
from tests.local_repos import write_repo
from tests.process_trees import all_gone, tree_of
from tests.remote_models import models_in_process, write_models_repo

pytestmark = pytest.mark.timeout(300)

CGROUPS = bool(memory_cgroup.probe()["available"])
# Without a memory cgroup a worker may fork only when no memory_limit holds it to one address space.
SANDBOX = Sandbox(timeout=120) if CGROUPS else Sandbox(timeout=120, memory_limit=None)

PROBE = '''
import os
import time

import torch

dependencies = ["torch"]


class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(x)

    def pid(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return os.getpid()

    def threads(self):
        return torch.get_num_threads()

    def filled(self, n, value):
        return torch.full((n,), float(value))

    def where(self):
        return {"cwd": os.getcwd(), "home": os.environ["HOME"], "tmp": os.environ["TMPDIR"]}


def probe():
    return Probe()
'''


def load(repo: Path, model: str, sandbox: Sandbox = SANDBOX, **kwargs):
    return safehub.load(str(repo), model, source="local", isolate=sandbox, returns="remote", **kwargs)


@pytest.fixture(scope="module")
def probe_repo(tmp_path_factory) -> Path:
    return write_repo(tmp_path_factory.mktemp("replicas-probe") / "repo", {"hubconf.py": PROBE})


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory) -> Path:
    return write_models_repo(tmp_path_factory.mktemp("replicas-models") / "repo")


@pytest.fixture(scope="module")
def pair(probe_repo):
    """Two replicas of the probe, for the tests that end none."""
    handle = load(probe_repo, "probe", replicas=2)
    yield handle
    handle.close()


def ns_pid(host_pid: int) -> int:
    """A process's pid in its own (innermost) pid namespace."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {host_pid}")


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def memory_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return ""


def test_outputs_from_many_threads_equal_in_process(models_repo):
    with models_in_process(models_repo) as hubconf:
        local = hubconf.convnet().eval()
    inputs = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    with torch.inference_mode():
        expected = [local(x) for x in inputs]
    with load(models_repo, "convnet", replicas=2) as remote:
        assert remote.eval() is remote  # made on both replicas: both in eval mode (dropout off)
        got: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def work(indices: range) -> None:
            try:
                for i in indices:
                    got[i] = remote(inputs[i])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(range(k, 12, 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in range(12):
            torch.testing.assert_close(got[i], expected[i], rtol=1e-5, atol=1e-6)
        assert remote.training is False


def test_each_replica_is_its_own_sandboxed_process(pair):
    pids = pair.replica_pids
    assert pair.replicas == 2 and len(set(pids)) == 2
    supervisor = pair.pid

    def settled(pid: int) -> bool:
        # A replica's first steps after its fork, which the load does not wait for: its own session,
        # its own memory cgroup. It serves (runs the repository's code) only after both.
        return os.getsid(pid) == pid and (not CGROUPS or memory_cgroup_of(pid) != memory_cgroup_of(supervisor))

    deadline = time.monotonic() + 30
    while not all(settled(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        assert pid != supervisor and supervisor in {p.pid for p in psutil.Process(pid).parents()}
        facts = status(pid)
        assert facts["Seccomp"] == "2" and facts["NoNewPrivs"] == "1"
        uid = int(facts["Uid"].split()[0])
        assert uid != 0 and (os.geteuid() != 0 or uid == 65534)
        assert os.getsid(pid) == pid  # a session (so a scheduler autogroup) of its own
    if CGROUPS:
        groups = {memory_cgroup_of(pid) for pid in pids}
        assert len(groups) == 2 and memory_cgroup_of(supervisor) not in groups
    # Each has its own folder (HOME, TMPDIR, working folder), and torch one thread (libgomp in a fork).
    places = set()
    for _ in range(2):
        where = pair.where()
        assert where["cwd"] == where["home"] == where["tmp"]
        places.add(where["cwd"])
    assert pair.threads() == 1


def test_large_tensors_cross_both_ways_on_every_replica(pair):
    """Through shared memory (memfds, or pools), not the frame: each replica's own, twice over."""
    n = 4 * 1024 * 1024  # 16 MiB of float32
    for session in pair._session.live:  # each replica addressed in turn
        for value in (3, 7):
            got = session.call("filled", (n, value), {}, inference=True)
            assert got.shape == (n,) and bool((got == value).all())
        echoed = session.call("__call__", (torch.ones(n // 8, 8),), {}, inference=True)
        assert echoed.shape == (n // 8, 2)


def test_a_busy_replica_leaves_calls_to_the_other_and_its_death_fails_its_call_only(probe_repo):
    handle = load(probe_repo, "probe", replicas=2)
    tree = tree_of(handle.pid)
    failures: list[BaseException] = []

    def sleep() -> None:
        try:
            handle.sleep(600)
        except BaseException as exc:  # noqa: BLE001 - checked below
            failures.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    # The sleeping replica holds its call; the calls meanwhile are served by the other one.
    awake = handle.call("pid")
    assert {handle.call("pid") for _ in range(3)} == {awake} and sleeper.is_alive()
    busy = next(pid for pid in handle.replica_pids if ns_pid(pid) != awake)
    os.kill(busy, 9)
    sleeper.join()
    assert len(failures) == 1 and isinstance(failures[0], WorkerCrashedError)
    assert "other replicas go on" in str(failures[0])
    assert handle.replicas == 1 and busy not in handle.replica_pids
    # The other replica serves on, from several threads (one call at a time).
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(handle.call("pid"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [awake] * 4
    handle.close()
    assert handle.closed and handle.replicas == 0
    assert all_gone(tree)


def test_an_idle_replica_that_died_fails_no_call(probe_repo):
    handle = load(probe_repo, "probe", replicas=2)
    try:
        victim = psutil.Process(handle.replica_pids[0])
        victim.kill()
        assert all_gone([victim])
        assert [handle.call("pid") for _ in range(3)]  # none of them fails
        assert handle.replicas == 1
    finally:
        tree = tree_of(handle.pid)
        handle.close()
    assert all_gone(tree)


def test_the_sets_idle_and_whole_life_bound_every_replica(probe_repo):
    idle = load(probe_repo, "probe", dataclasses.replace(SANDBOX, idle_timeout=1.0), replicas=2)
    tree = tree_of(idle.pid)
    idle.sleep(1.5)  # a call on one replica counts as the set's activity, however long
    assert all_gone(tree, timeout=30)
    with pytest.raises(RemoteClosedError, match=r"sat idle for 1 s \(Sandbox\(idle_timeout=...\)\)"):
        idle.call("pid")
    short = load(probe_repo, "probe", dataclasses.replace(SANDBOX, lifetime=3.0), replicas=2)
    tree = tree_of(short.pid)
    with pytest.raises(RemoteClosedError, match="lifetime of 3 s ran out"):
        short.sleep(60)
    assert all_gone(tree) and short.replicas == 0


def test_without_a_fork_replicas_are_refused_with_the_reason(probe_repo, monkeypatch):
    limited = Sandbox(timeout=120)  # a memory_limit: without a cgroup, one address space
    if CGROUPS:
        # As root: no cgroup for this worker, so seccomp refuses fork in it; the worker says so.
        monkeypatch.setattr(memory_cgroup.MemoryCgroup, "create", staticmethod(lambda limit: None))
        warm.stop()  # nor the cgroup the warm path made for its spare worker before
        with pytest.raises(SandboxError, match="could not fork a replica.*Operation not permitted"):
            load(probe_repo, "probe", limited, replicas=2)
        # ... and where the parent knows beforehand, nothing is loaded.
        monkeypatch.setattr(memory_cgroup, "probe", lambda: {"available": False})
    with pytest.raises(SandboxError, match="here it may not.*seccomp refuses fork.*memory_limit=None") as caught:
        load(probe_repo, "probe", limited, replicas=2)
    assert caught.value.layer == "memory_cgroup"


@pytest.mark.parametrize("replicas, returns, error", [
    (0, "remote", InvalidArgumentError), ("2", "remote", InvalidArgumentError), (True, "remote", InvalidArgumentError),
    (1000, "remote", InvalidArgumentError), (2, "weights", InvalidArgumentError),
])
def test_bad_replicas_are_refused_before_anything_runs(probe_repo, replicas, returns, error):
    with pytest.raises(error, match="replicas"):
        safehub.load(str(probe_repo), "probe", source="local", isolate=SANDBOX, returns=returns, replicas=replicas)


def test_cold_workers_replicate_too(probe_repo, monkeypatch):
    monkeypatch.setenv("SAFEHUB_WARM", "0")
    with load(probe_repo, "probe", replicas=2) as handle:
        x = torch.rand(3, 8)
        torch.testing.assert_close(handle(x), handle(x))
        assert len(set(handle.replica_pids)) == 2
        for pid in handle.replica_pids:
            assert status(pid)["Seccomp"] == "2"
        tree = tree_of(handle.pid)
    assert all_gone(tree)
