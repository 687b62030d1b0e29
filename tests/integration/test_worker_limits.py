"""A worker's total writes, its processes and its threads: bounded, and room for real workloads.

Every test runs with a cold worker and a warm one (``worker_start``). The attacks themselves
(filling the scratch, a fork bomb at the default limit) are in tests/security/attacks.py; these
check what a repository that behaves sees: a scratch folder of ``max_scratch_size`` in memory,
ENOSPC past it and a call that says so, torch's thread pool of a large machine.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

import safehub
from safehub._run import call as _call
from safehub._run import memory_cgroup
from safehub._run import process as _process
from safehub._run import reaper, run_isolated
from safehub._sandbox import Sandbox, default_max_processes
from safehub.errors import SandboxLimitError
from tests.local_repos import write_repo

MIB = 1024**2
GIB = 1024**3
pytestmark = pytest.mark.usefixtures("worker_start")

HUBCONF = '''
    import errno
    import os

    dependencies = []


    def scratch():
        """Where the worker writes, and how large that is."""
        with open("probe.txt", "w") as f:
            f.write("written in the worker")
        st = os.statvfs(".")
        return {
            "cwd": os.getcwd(), "home": os.environ["HOME"], "tmpdir": os.environ["TMPDIR"],
            "size": st.f_blocks * st.f_frsize, "files": sorted(os.listdir(".")),
            "mode": oct(os.stat(".").st_mode & 0o7777),
        }


    def fill(budget_mib=64, catch=False):
        """Write one file of 4 MiB chunks until the budget or a refusal."""
        written = 0
        try:
            with open("big.bin", "wb") as f:
                for _ in range(budget_mib // 4):
                    f.write(b"\\0" * (4 << 20))
                    f.flush()
                    written += 4
        except OSError as exc:
            if not catch:
                raise
            return {"written": written, "errno": exc.errno}
        return {"written": written, "errno": 0}


    def hog(mib=2048):
        """Touch memory 64 MiB at a time, up to mib (bounded, should no limit hold)."""
        import mmap
        blocks = []
        for _ in range(mib // 64):
            block = mmap.mmap(-1, 64 << 20)
            block.write(b"x" * (64 << 20))
            blocks.append(block)
        return {"held_mib": 64 * len(blocks)}


    class Stay:
        def ping(self):
            return "pong"


    def stay():
        """A model that stays in its worker (returns="remote")."""
        return Stay()


    def threads(n):
        """torch's intra-op pool of n threads, used."""
        import torch

        torch.set_num_threads(n)
        a = torch.randn(256, 256)
        for _ in range(10):
            a @ a
        return {"threads": torch.get_num_threads(), "tasks": len(os.listdir("/proc/self/task"))}
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = write_repo(tmp_path_factory.mktemp("limits") / "repo", {"hubconf.py": HUBCONF})
    for path in (root, *root.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # a dropped worker reads it
    return root


def _mount_namespace_here() -> bool:
    """Can a worker get a private mount namespace (for the scratch tmpfs) on this machine?"""
    return os.geteuid() == 0 or safehub.sandbox_report()["namespaces"]["active"]


@pytest.fixture
def host_scratch(monkeypatch):
    """What each call's scratch folder held on the host when the call ended."""
    reaper.drain()  # earlier calls' folders, removed in the background, are not this call's
    seen: list[list[str]] = []
    real = _process.remove_tree

    def remove_tree(path: Path) -> None:
        seen.append(sorted(p.name for p in Path(path).rglob("*")))
        real(path)

    monkeypatch.setattr(_process, "remove_tree", remove_tree)
    return seen


def test_the_scratch_is_a_tmpfs_of_max_scratch_size(repo, host_scratch):
    if not _mount_namespace_here():
        pytest.skip("no mount namespace for a worker here: each file is bounded instead (tested below)")
    got = run_isolated(repo, "load", model="scratch", sandbox=Sandbox(timeout=60, max_scratch_size=64 * MIB))
    assert got["size"] == 64 * MIB
    assert got["cwd"] == got["home"] == got["tmpdir"]
    assert got["files"] == ["probe.txt", "repo"]  # what it wrote, and the repository's private view (repo_view.py)
    reaper.drain()  # the call returned with its answer; its end ran in the background
    assert host_scratch == [[]]  # what the worker wrote never reached the disk


def test_the_default_scratch_is_bounded_too(repo):
    if not _mount_namespace_here():
        pytest.skip("no mount namespace for a worker here")
    got = run_isolated(repo, "load", model="scratch", sandbox=Sandbox(timeout=60))
    expected = Sandbox().max_scratch_size
    if not memory_cgroup.probe()["available"]:
        expected = min(expected, Sandbox().memory_limit // 4)  # the memory bound's share (SECURITY.md)
    assert got["size"] == expected


def test_each_worker_has_a_memory_cgroup_of_memory_limit_removed_after(repo, monkeypatch):
    bound = memory_cgroup.probe()
    if not bound["available"]:
        pytest.skip(f"no memory cgroup here ({bound['detail']}); the address-space bound is attacked in tests/security")
    made: list[memory_cgroup.MemoryCgroup] = []
    real = _process.launch.start_worker

    def start_worker(*args, **kwargs):  # the worker's cgroup: made for it, or its spare's
        proc, sock, cgroup = real(*args, **kwargs)
        made.append(cgroup)
        return proc, sock, cgroup

    monkeypatch.setattr(_process.launch, "start_worker", start_worker)
    remote = run_isolated(repo, "load", model="stay", returns="remote", sandbox=Sandbox(timeout=60, memory_limit=3 * GIB))
    try:
        assert remote.ping() == "pong"
        (group,) = made
        limit = "memory.limit_in_bytes" if group.version == "v1" else "memory.max"
        assert int((group.path / limit).read_text()) == 3 * GIB
        members = {int(pid) for pid in (group.path / "cgroup.procs").read_text().split()}
        assert members, "the worker is not in its cgroup"
        assert os.getpid() not in members
    finally:
        remote.close()
    assert not group.path.exists()


def test_memory_limit_hit_is_the_sandboxs_limit_not_the_repositorys_fault(repo):
    # Whichever way it is hit here (a warm worker short of address space while it starts, the
    # entrypoint's MemoryError, the memory cgroup's OOM kill), the caller hears the limit's name
    # and value, never "the repository failed" or "the worker failed outside the repository".
    with pytest.raises(SandboxLimitError) as info:
        run_isolated(repo, "load", model="hog", sandbox=Sandbox(timeout=120, memory_limit=512 * MIB))
    assert info.value.limit == "memory_limit" and info.value.value == 512 * MIB
    assert "memory limit of 512 MiB was hit" in str(info.value) and "Sandbox(memory_limit=...)" in str(info.value)


def test_writes_past_max_scratch_size_fail_and_the_call_says_why(repo):
    if not _mount_namespace_here():
        pytest.skip("no mount namespace for a worker here")
    with pytest.raises(SandboxLimitError) as info:
        run_isolated(repo, "load", model="fill", sandbox=Sandbox(timeout=60, max_scratch_size=16 * MIB))
    message = str(info.value)
    assert info.value.limit == "max_scratch_size" and info.value.value == 16 * MIB
    assert "No space left on device" in message and "max_scratch_size" in message


def test_a_full_scratch_is_reported_when_the_repository_carries_on(repo, caplog):
    if not _mount_namespace_here():
        pytest.skip("no mount namespace for a worker here")
    with caplog.at_level(logging.WARNING, logger="safehub"):
        got = run_isolated(
            repo, "load", model="fill", kwargs={"catch": True}, sandbox=Sandbox(timeout=60, max_scratch_size=16 * MIB)
        )
    assert got["errno"] == errno.ENOSPC and got["written"] <= 16
    assert any("filled its scratch folder" in r.getMessage() for r in caplog.records)


def test_a_scratch_with_room_left_is_not_reported(repo, caplog):
    with caplog.at_level(logging.WARNING, logger="safehub"):
        got = run_isolated(repo, "load", model="fill", kwargs={"budget_mib": 8}, sandbox=Sandbox(timeout=60))
    assert got == {"written": 8, "errno": 0}
    assert not any("scratch" in r.getMessage() for r in caplog.records)


def test_without_namespaces_the_scratch_is_bounded_per_file_and_the_call_warns(repo, caplog, monkeypatch):
    # Root can always make a mount namespace; anyone else needs a user namespace for one.
    monkeypatch.setattr(_call, "_reported", set())
    sandbox = Sandbox(timeout=60, max_scratch_size=16 * MIB, layers=("landlock", "seccomp", "rlimits", "uid_drop"))
    with caplog.at_level(logging.WARNING, logger="safehub"):
        got = run_isolated(repo, "load", model="fill", kwargs={"catch": True}, sandbox=sandbox)
    assert got["written"] <= 16
    if os.geteuid() == 0:
        assert got["errno"] == errno.ENOSPC
    else:
        assert got["errno"] == errno.EFBIG  # RLIMIT_FSIZE: the file, not the total
        assert any("scratch_limit" in r.getMessage() and "not their total" in r.getMessage() for r in caplog.records)


def test_torch_gets_a_thread_per_core_of_a_large_machine(repo):
    # The default for a 96-CPU machine, with 96 intra-op threads started and used: each counts.
    cpus = 96
    sandbox = Sandbox(timeout=120, max_processes=default_max_processes(cpus))
    got = run_isolated(repo, "load", model="threads", args=(cpus,), sandbox=sandbox)
    assert got["threads"] == cpus and got["tasks"] >= cpus
