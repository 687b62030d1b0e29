"""The warm path: the zygote's life (lazy start, reuse, restart, death with its parent) and what a
worker it forks gets (a fresh process, the full sandbox, nothing left behind). Real processes.

The guarantees both paths share run on both in test_isolation.py and test_side_by_side.py
(``worker_start``); these are the zygote's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import safehub
from safehub import _bwrap
from safehub._run import call as _isolation
from safehub._run import memory_cgroup
from safehub._run import reaper, run_isolated
from safehub._run import warm as _zygote
from safehub._sandbox import ALLOWED_ENV, Sandbox
from safehub.errors import ResultDecodeError, WorkerCrashedError, WorkerTimeoutError

ROOT = Path(__file__).parents[2]
# Host pids are visible only without the pid namespace: the tests that follow processes use it.
BARE = Sandbox(timeout=60, layers=())

HUBCONF = '''
import os
import time

dependencies = []


def ids():
    """Who the worker is: its pid and its parent's parent (the zygote, on the warm path)."""
    with open("/proc/%d/stat" % os.getppid()) as f:
        stat = f.read()
    return {"pid": os.getpid(), "grandparent": int(stat[stat.rindex(")") + 2 :].split()[1])}


def threads():
    import torch

    return {"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}


def daemon():
    """Leave a double-forked, setsid'd grandchild behind, and say its pid."""
    pid_file = os.path.join(os.environ["TMPDIR"], "daemon.pid")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            time.sleep(600)
        os._exit(0)
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    with open(pid_file) as f:
        return int(f.read())


def family():
    """This work process and a daemon it leaves behind (host pids with no pid namespace)."""
    return {"pid": os.getpid(), "daemon": daemon()}


def alive(pids):
    """Which of ``pids`` this worker sees alive in /proc (zombies aside)."""
    seen = []
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            seen.append(pid)
    return seen


def reach(pid):
    """Try to kill, read and write the process ``pid`` (the zygote); say what each try gave."""
    def attempt(action):
        try:
            action()
            return "done"
        except OSError as exc:
            return type(exc).__name__

    def read(name):
        with open("/proc/%d/%s" % (pid, name), "rb") as f:
            f.read(1)

    def write_mem():
        with open("/proc/%d/mem" % pid, "wb") as f:
            f.write(b"x")

    return {
        "kill": attempt(lambda: os.kill(pid, 9)),
        "environ": attempt(lambda: read("environ")),
        "mem": attempt(write_mem),
    }


def spin():
    if os.fork() == 0:
        while True:
            pass
    while True:
        pass
'''

HELPER_HUBCONF = '''
dependencies = []
from warm_helpers.things import Thing


def thing():
    """A thing."""
    return Thing()
'''


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "warm_helpers").mkdir(parents=True)
    (root / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    (root / "warm_helpers" / "__init__.py").write_text("")
    (root / "warm_helpers" / "things.py").write_text("class Thing:\n    def hello(self):\n        return 'hi'\n")
    os.chmod(tmp_path, 0o755)  # as root the worker drops to uid 65534, which must read the repository
    return root


@pytest.fixture(autouse=True)
def warm(monkeypatch):
    monkeypatch.setenv("SAFEHUB_WARM", "1")
    if not safehub.warmup():
        pytest.skip("the warm zygote cannot start on this machine")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}


def nothing_left(before: set[int]) -> bool:
    """Once the last call's processes are reaped: of the processes alive ``before`` it (the zygote
    and the spare worker that took the call), only the zygote is; what is new is the next spare
    alone (its supervisor, its init in a pid namespace, its work process)."""
    reaper.settle()
    after = descendants()
    return before & after == {_zygote.current_pid()} and len(after - before) <= 3


def test_the_zygote_starts_on_first_use_and_is_reused(repo):
    _zygote.stop()
    safehub.Sandbox()
    assert _zygote.current_pid() is None  # importing and configuring start nothing
    first = run_isolated(repo, "load", model="ids", sandbox=BARE)
    zygote = _zygote.current_pid()
    assert zygote is not None and psutil.Process(zygote).ppid() == os.getpid()
    second = run_isolated(repo, "load", model="ids", sandbox=BARE)
    assert _zygote.current_pid() == zygote
    # A fresh worker per call, each forked (through its supervisor) by the same zygote; the first
    # is gone before the second starts, the second once the background reaping settled.
    assert first["grandparent"] == second["grandparent"] == zygote
    assert first["pid"] != second["pid"] and gone(first["pid"])
    reaper.settle()
    assert gone(second["pid"])


def test_threads_share_one_zygote(repo, monkeypatch):
    _zygote.stop()
    starts = []
    real_start = _zygote.Zygote.start.__func__
    monkeypatch.setattr(_zygote.Zygote, "start", classmethod(lambda cls, key: starts.append(1) or real_start(cls, key)))
    results, errors = [], []

    def call() -> None:
        try:
            results.append(run_isolated(repo, "load", model="ids", sandbox=BARE)["grandparent"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(starts) == 1
    assert set(results) == {_zygote.current_pid()}


def test_the_zygote_is_started_again_after_being_killed(repo):
    zygote = _zygote.current_pid()
    os.kill(zygote, signal.SIGKILL)
    # At once, before it is even reaped: the call still gets an answer (warm again, or cold).
    assert run_isolated(repo, "list", sandbox=BARE) == ["alive", "daemon", "family", "ids", "reach", "spin", "threads"]
    assert wait_until(lambda: gone(zygote))
    assert run_isolated(repo, "load", model="ids", sandbox=BARE)["grandparent"] == _zygote.current_pid()
    assert _zygote.current_pid() not in (None, zygote)


def test_a_new_thread_setting_starts_a_new_zygote(repo, monkeypatch):
    # torch reads the thread variables when it is imported, in the zygote: a change needs a new one.
    zygote = _zygote.current_pid()
    monkeypatch.setenv("OMP_NUM_THREADS", "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1")
    warm = run_isolated(repo, "load", model="threads", sandbox=BARE)
    assert _zygote.current_pid() != zygote
    monkeypatch.setenv("SAFEHUB_WARM", "0")
    assert warm == run_isolated(repo, "load", model="threads", sandbox=BARE)  # as a cold worker sees it
    assert wait_until(lambda: gone(zygote))  # the old one left once its socket closed


def test_switched_off_no_zygote_starts(repo, monkeypatch):
    _zygote.stop()
    monkeypatch.setenv("SAFEHUB_WARM", "0")
    assert not safehub.warmup()
    assert run_isolated(repo, "list", sandbox=BARE)
    assert _zygote.current_pid() is None


ZYGOTE_PARENT = """
import sys, time
import safehub
from safehub._run import warm as _zygote
assert safehub.warmup()
print(_zygote.current_pid(), flush=True)
time.sleep(600)
"""


def test_the_zygote_holds_no_secret_and_dies_with_its_parent(tmp_path):
    env = {**os.environ, "GITHUB_TOKEN": "ghp_zygote_canary", "AWS_SECRET_ACCESS_KEY": "aws_canary"}
    env["PYTHONPATH"] = str(ROOT)
    parent = subprocess.Popen([sys.executable, "-c", ZYGOTE_PARENT], stdout=subprocess.PIPE, cwd=tmp_path, env=env)
    zygote = None
    try:
        zygote = int(parent.stdout.readline())
        proc = psutil.Process(zygote)
        assert proc.ppid() == parent.pid
        environ = proc.environ()
        assert "canary" not in repr(environ)
        assert set(environ) <= set(ALLOWED_ENV) | {"HOME", "TMPDIR"} | {n for n in environ if n.startswith("LC_")}
        assert str(tmp_path) not in proc.cwd()
        assert proc.cmdline()[1:3] == ["-I", "-B"] and "--zygote" in proc.cmdline()
        parent.kill()  # no finally, no atexit: only the zygote's own watch can end it
        parent.wait()
        assert wait_until(lambda: gone(zygote))
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if zygote is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(zygote).kill()


# No memory_limit for the forking workloads: without a memory cgroup a worker under one may not
# fork at all (SECURITY.md, "One memory bound"), and these test what is left behind a fork.
@pytest.mark.parametrize("sandbox", [BARE, Sandbox(timeout=60, memory_limit=None)], ids=["bare", "every-layer"])
def test_nothing_is_left_behind_a_warm_call(repo, sandbox):
    before = descendants()
    daemon = run_isolated(repo, "load", model="daemon", sandbox=sandbox)
    assert isinstance(daemon, int)
    assert nothing_left(before)
    if sandbox is BARE:  # a host pid; in a pid namespace it names nothing out here
        assert gone(daemon)


def test_timeout_on_the_warm_path(repo):
    zygote = _zygote.current_pid()
    before = descendants()
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError):
        run_isolated(repo, "load", model="spin", sandbox=Sandbox(timeout=1.5, memory_limit=None))
    assert time.monotonic() - start < 6
    assert nothing_left(before)
    assert run_isolated(repo, "load", model="ids", sandbox=BARE)["grandparent"] == zygote


def test_a_warm_worker_has_the_layers_of_a_cold_one(repo, monkeypatch):
    reports = []
    real = _isolation._report_missing_layers
    monkeypatch.setattr(_isolation, "_report_missing_layers", lambda report: reports.append(report) or real(report))
    run_isolated(repo, "list", sandbox=Sandbox())
    monkeypatch.setenv("SAFEHUB_WARM", "0")
    run_isolated(repo, "list", sandbox=Sandbox())
    warm, cold = (set(r["applied"]) for r in reports)
    offered = {name for name, layer in safehub.sandbox_report().items() if layer["active"]}
    assert offered - {"bubblewrap"} <= warm
    assert warm == cold - {"bubblewrap"}  # the namespaces come from unshare instead


def test_bubblewrap_without_landlock_goes_cold(repo, monkeypatch):
    # Without Landlock only bubblewrap hides the host's files, and only a cold worker gets it.
    if not _bwrap.bwrap_works():
        pytest.skip("bubblewrap cannot run here: no cold path with it to choose")
    reports = []
    real = _isolation._report_missing_layers
    monkeypatch.setattr(_isolation, "_report_missing_layers", lambda report: reports.append(report) or real(report))
    run_isolated(repo, "list", sandbox=Sandbox(layers=("namespaces", "bubblewrap")))
    run_isolated(repo, "list", sandbox=Sandbox(layers=("namespaces", "bubblewrap", "landlock")))
    assert "bubblewrap" in reports[0]["applied"] and "bubblewrap" not in reports[1]["applied"]


@pytest.mark.parametrize(
    "layers", [None, ("landlock", "seccomp", "rlimits", "uid_drop")], ids=["every-layer", "no-namespaces"]
)
def test_a_worker_cannot_reach_the_zygote(repo, layers):
    # The zygote outlives the call: a worker that could kill or write it would reach the next ones.
    needed = "namespaces" if layers is None else "landlock"
    if not safehub.sandbox_report()[needed]["active"]:
        pytest.skip(f"no {needed} here")
    zygote = _zygote.current_pid()
    tries = run_isolated(repo, "load", model="reach", args=(zygote,), sandbox=Sandbox(timeout=60, layers=layers))
    assert "done" not in tries.values(), tries
    assert _zygote.current_pid() == zygote and not gone(zygote)


@pytest.mark.usefixtures("worker_start")
@pytest.mark.parametrize("action", ["list", "help", "object", "weights"])
def test_the_parent_imports_nothing_of_the_repository(repo, action):
    before = set(sys.modules)
    if action == "list":
        run_isolated(repo, "list", sandbox=BARE)
    elif action == "help":
        run_isolated(repo, "help", model="ids", sandbox=BARE)
    else:
        (repo / "hubconf.py").write_text(textwrap.dedent(HELPER_HUBCONF))
        if action == "object":
            assert run_isolated(repo, "load", model="thing", sandbox=BARE).hello() == "hi"
        else:
            with contextlib.suppress(ResultDecodeError):  # a Thing is no weights
                run_isolated(repo, "load", model="thing", returns="weights", sandbox=BARE)
    new = set(sys.modules) - before
    assert not {"hubconf", "warm_helpers", "warm_helpers.things"} & set(sys.modules)
    assert not [n for n in new if str(getattr(sys.modules[n], "__file__", "")).startswith(str(repo))]


def spare_tree() -> set[int]:
    """Every process under the zygote: between calls, its spare worker's."""
    return {p.pid for p in psutil.Process(_zygote.current_pid()).children(recursive=True) if not gone(p.pid)}


def test_no_process_of_a_call_outlives_the_next_ones_start(repo):
    # Returned at once, its end left to the background: the next call's worker looks in /proc
    # (the host's, without a pid namespace) for the last one's work process and its daemon.
    first = run_isolated(repo, "load", model="family", sandbox=BARE)
    assert run_isolated(repo, "load", model="alive", args=([first["pid"], first["daemon"]],), sandbox=BARE) == []
    # The canary can fail: the same look at processes that are alive.
    assert run_isolated(repo, "load", model="alive", args=([os.getpid(), _zygote.current_pid()],), sandbox=BARE) != []


@pytest.mark.parametrize("which", ["supervisor", "work process"])
@pytest.mark.parametrize("sandbox", [BARE, Sandbox(timeout=60)], ids=["bare", "every-layer"])
def test_a_spare_that_died_is_replaced_and_the_call_still_works(repo, which, sandbox):
    run_isolated(repo, "list", sandbox=sandbox)  # the next spare is prepared for this call's shape
    reaper.settle()  # that call's processes gone: what is left under the zygote is its spare
    # Its supervisor and work process, and the pid namespace's init between them where there is one.
    size = 3 if sandbox is not BARE and safehub.sandbox_report()["namespaces"]["active"] else 2
    assert wait_until(lambda: len(spare_tree()) == size)
    (supervisor,) = psutil.Process(_zygote.current_pid()).children()
    tree = [supervisor, *supervisor.children(recursive=True)]
    victim = supervisor if which == "supervisor" else next(p for p in tree if not p.children())
    victim.kill()
    # At once: the zygote may not have seen it die yet. Either a new worker takes the call, or the
    # spare took it as the kill landed and the call fails as that worker's crash, at once (never a
    # second worker on the call's channel, which could wait out the timeout for a CALL it never gets).
    try:
        assert run_isolated(repo, "load", model="ids", sandbox=sandbox)["pid"] > 0
    except WorkerCrashedError as exc:
        assert "SIGKILL" in str(exc) or "killed" in str(exc), exc
    assert wait_until(lambda: all(gone(p.pid) for p in tree))
    # Once its death is seen, a spare's is never a call's: the next call gets a working worker.
    assert run_isolated(repo, "load", model="ids", sandbox=sandbox)["pid"] > 0
    reaper.settle()
    assert wait_until(lambda: len(spare_tree()) == size)  # a new spare, ready for the next call
    assert not set(spare_tree()) & {p.pid for p in tree}


def test_no_spare_is_left_after_stop(repo):
    run_isolated(repo, "list", sandbox=Sandbox(timeout=60))
    reaper.settle()
    assert wait_until(lambda: len(spare_tree()) >= 2)
    spare = spare_tree()
    _zygote.stop()
    assert descendants() == set()  # the zygote waited for its spare before it exited
    assert all(gone(pid) for pid in spare)
    bound = memory_cgroup.probe()
    if bound["available"]:
        version, parent = memory_cgroup._parent_folder()
        assert not list(parent.glob(f"safehub-{os.getpid()}-*"))  # the spare's cgroup too
