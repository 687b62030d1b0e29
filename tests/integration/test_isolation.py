"""run_isolated with real worker processes, against local hubconf folders.

Every test runs twice (``worker_start``, tests/conftest.py): with a cold worker per call, and
with workers forked by the warm zygote; both must keep every guarantee. Pure-Python repositories
never import torch, so their cold workers start in a fraction of a second; only the tests about
tensors pay for a cold ``import torch`` in the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.local_repos import imported_in_process, write_repo
from safehub._run import reaper, run_isolated
from safehub._run.output import OUTPUT_CAP, OUTPUT_TRUNCATED
from safehub._sandbox import Sandbox
from safehub._worker import hubconf as in_process
from safehub.errors import (
    EntrypointNotFoundError,
    HubconfError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    InvalidArgumentError,
    WorkerCrashedError,
    WorkerTimeoutError,
)

SANDBOX = Sandbox(timeout=60)
# A forged memfd needs memfd_create, which a worker without a memory cgroup may not call when a
# memory_limit holds (SECURITY.md, "One memory bound"): those forgeries run without one.
UNBOUNDED = Sandbox(timeout=60, memory_limit=None)
# The process-tree tests watch the worker's processes from here by their pids, and the worker
# writes those pids outside its scratch folder: with only the always-on layers (fresh session,
# supervisor, timeout, tree kill), which are the ones under test, pids are the host's and the
# test's folder is writable. tests/security/ runs the same attacks under every layer.
BARE = dict(layers=())
pytestmark = pytest.mark.usefixtures("worker_start")


PURE_HUBCONF = '''
    """A repository whose hubconf never imports torch."""
    import os
    import sys
    import time

    dependencies = []
    NOT_CALLABLE = 3


    def hello(name="world"):
        """Say hello to someone.

        Args:
            name: who.
        """
        return {"greeting": "hello " + name}


    def _private():
        return "hidden"


    def number():
        return 7


    def inspect():
        return {
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "path": list(sys.path),
            "modules": sorted(sys.modules),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "umask": os.umask(0o077),
        }


    def boom():
        raise ValueError("boom: the repository failed")  # the raising line


    def exit3():
        os._exit(3)


    def segv():
        os.kill(os.getpid(), __import__("signal").SIGSEGV)


    def spin(pid_file):
        if os.fork() == 0:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            while True:
                pass
        while True:
            pass


    def daemon():
        pid_file = os.path.join(os.environ["TMPDIR"], "daemon.pid")
        first = os.fork()
        if first == 0:
            os.setsid()
            if os.fork() == 0:
                with open(pid_file + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(pid_file + ".tmp", pid_file)
                time.sleep(600)
            os._exit(0)
        os.waitpid(first, 0)
        for _ in range(1000):
            if os.path.exists(pid_file):
                break
            time.sleep(0.01)
        with open(pid_file) as f:
            return int(f.read())


    def say():
        print("hello from the repository")
        print("and a warning", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        return "said"


    def shout():
        for _ in range(50):
            sys.stdout.write(("y" * 99 + "\\n") * 1000)  # 5 MB in all
        return "done"
'''

HOSTILE_HUBCONF = '''
    """Entrypoints that write into the result channel behind the worker's back."""
    import json
    import os
    import pickle
    import socket
    import struct
    import sys
    import time


    def _channel():
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                    return int(name)
            except OSError:
                pass
        raise RuntimeError("no channel")


    def _protocol():
        """The worker's own frame code: hostile code can import it as the worker did."""
        return sys.modules["_safehub_worker.protocol"]


    def _frame(fields, buffers=(), nfds=0):
        head = _protocol().encode_head("result", fields, [len(b) for b in buffers], nfds)
        return head + b"".join(buffers)


    class Canary:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('the parent ran my code')" % self.path,))


    def _send(data, then_sleep=False):
        os.write(_channel(), data)
        if then_sleep:
            time.sleep(60)
        os._exit(0)


    def garbage():
        _send(b"HTTP/1.1 200 OK\\r\\n\\r\\n" + os.urandom(200))


    def huge_prefix():
        protocol = _protocol()
        code = protocol.MESSAGES["result"].code
        _send(protocol.PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, code, 0, 0, 0xFFFFFFFF), then_sleep=True)


    def forged_object(canary):
        payload = pickle.dumps(Canary(canary))
        fields = {"action": "load", "returns": "object", "transport": "inline", "sizes": [len(payload)]}
        _send(_frame(fields, [payload]))


    def forged_weights(canary):
        payload = pickle.dumps(Canary(canary))
        fields = {"action": "load", "returns": "weights", "transport": "inline", "sizes": [len(payload)]}
        _send(_frame(fields, [payload]))


    def bad_weights_header():
        header = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
        payload = struct.pack("<Q", len(header)) + header + b"\\0" * 16
        fields = {"action": "load", "returns": "weights", "transport": "inline", "sizes": [len(payload)]}
        _send(_frame(fields, [payload]))


    def unsealed_memfd():
        header = json.dumps({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
        payload = struct.pack("<Q", len(header)) + header + b"\\1"
        fd = os.memfd_create("not-sealed")
        os.write(fd, payload)
        fields = {"action": "load", "returns": "weights", "transport": "memfd", "sizes": [len(payload)]}
        sock = socket.socket(fileno=_channel())
        sock.sendmsg([_frame(fields, nfds=1)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os._exit(0)
'''

TORCH_HUBCONF = '''
    """A repository with a model whose classes live in a helper package."""
    dependencies = ["torch"]

    import torch
    from models.net import TinyNet


    def tiny(width=4):
        """A tiny network."""
        torch.manual_seed(0)
        return TinyNet(width)


    def tensors():
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        return {
            "matrix": base,
            "transposed": base.t(),
            "row": base[1],
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.empty(0, 3),
            "bhalf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "half": torch.tensor([0.5], dtype=torch.float16),
            "flags": torch.tensor([True, False]),
            "ints": torch.tensor([-3, 4], dtype=torch.int32),
            "bytes": torch.tensor([255], dtype=torch.uint8),
        }
'''

MODELS_NET = """
    import torch
    from torch import nn

    from .layers import Double


    class TinyNet(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, 2)
            self.twice = Double()
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

        def forward(self, x):
            self.calls += 1
            return self.twice(self.fc(x))
"""

MODELS_LAYERS = """
    from torch import nn


    class Double(nn.Module):
        def forward(self, x):
            return x * 2
"""


def alt_repo(root: Path, label: str) -> Path:
    return write_repo(
        root,
        {
            "hubconf.py": """
                dependencies = []
                from models.thing import Thing

                def thing():
                    return Thing()
            """,
            "models/__init__.py": "",
            "models/thing.py": f"""
                from .voice import VOICE

                class Thing:
                    def behave(self):
                        return VOICE + "{label}"
            """,
            "models/voice.py": "VOICE = 'I am repository '\n",
        },
    )


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    return {
        "pure": write_repo(root / "pure", {"hubconf.py": PURE_HUBCONF}),
        "hostile": write_repo(root / "hostile", {"hubconf.py": HOSTILE_HUBCONF}),
        "torch": write_repo(
            root / "torch",
            {
                "hubconf.py": TORCH_HUBCONF,
                "models/__init__.py": "",
                "models/net.py": MODELS_NET,
                "models/layers.py": MODELS_LAYERS,
            },
        ),
        "deps": write_repo(
            root / "deps",
            {"hubconf.py": "dependencies = ['os', 'not_installed_a', 'not_installed_b']\ndef m():\n    return 1\n"},
        ),
        "broken": write_repo(root / "broken", {"hubconf.py": "import os\nraise ImportError('broken at import')\n"}),
        "empty": write_repo(root / "empty", {"README": "no hubconf here\n"}),
        "alt_a": alt_repo(root / "alt_a", "A"),
        "alt_b": alt_repo(root / "alt_b", "B"),
    }


# -- list, help, load agree with the in-process path -------------------------------------------


def test_list_matches_in_process(repos):
    with imported_in_process(repos["pure"]) as module:
        expected = in_process.list_entrypoints(module)
    assert run_isolated(repos["pure"], "list", sandbox=SANDBOX) == expected
    assert "_private" not in expected and "NOT_CALLABLE" not in expected and "hello" in expected


def test_help_matches_in_process(repos):
    with imported_in_process(repos["pure"]) as module:
        expected = in_process.get_entrypoint(module, "hello").__doc__
    assert run_isolated(repos["pure"], "help", model="hello", sandbox=SANDBOX) == expected
    assert "Say hello" in expected


def test_load_object_with_arguments(repos):
    result = run_isolated(repos["pure"], "load", model="hello", kwargs={"name": "safehub"}, sandbox=SANDBOX)
    assert result == {"greeting": "hello safehub"}
    assert run_isolated(repos["pure"], "load", model="hello", args=("you",), sandbox=SANDBOX) == {"greeting": "hello you"}


# -- objects: the repository's classes come by value -------------------------------------------


def test_module_object_from_a_helper_package(repos, tmp_path):
    path_before, modules_before = list(sys.path), set(sys.modules)
    model = run_isolated(repos["torch"], "load", model="tiny", kwargs={"width": 4}, sandbox=SANDBOX)
    assert sys.path == path_before
    assert not {"models", "models.net", "models.layers", "hubconf"} & set(sys.modules)
    assert not any(name.startswith("models") for name in set(sys.modules) - modules_before)
    assert type(model).__name__ == "TinyNet" and type(model).__module__ == "models.net"

    with imported_in_process(repos["torch"]) as module:
        expected = in_process.get_entrypoint(module, "tiny")(width=4)
    x = torch.ones(3, 4)
    assert torch.equal(model(x), expected(x))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    model(x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(model.fc.weight, before)

    state = model.state_dict()
    assert set(state) == {"calls", "fc.weight", "fc.bias"} and int(state["calls"]) == 2
    torch.save(state, tmp_path / "state.pt")
    assert set(torch.load(tmp_path / "state.pt", weights_only=True)) == set(state)


def test_two_repositories_with_the_same_package_name_stay_apart(repos):
    for _ in range(2):
        for label in ("A", "B"):
            thing = run_isolated(repos[f"alt_{label.lower()}"], "load", model="thing", sandbox=SANDBOX)
            assert thing.behave() == "I am repository " + label
    assert "models" not in sys.modules


# -- weights: tensors only, never a pickle -----------------------------------------------------


def test_weights_match_the_in_process_state_dict(repos):
    weights = run_isolated(repos["torch"], "load", model="tiny", returns="weights", sandbox=SANDBOX)
    with imported_in_process(repos["torch"]) as module:
        model = in_process.get_entrypoint(module, "tiny")()
        expected = model.state_dict()
        assert list(weights) == list(expected)
        assert all(torch.equal(weights[k], expected[k]) and weights[k].dtype == expected[k].dtype for k in expected)
        model.load_state_dict(weights)
    weights["fc.weight"] += 1  # copy-on-write: the tensors are the caller's to change


def test_weights_of_every_dtype_and_layout(repos):
    weights = run_isolated(repos["torch"], "load", model="tensors", returns="weights", sandbox=SANDBOX)
    with imported_in_process(repos["torch"]) as module:
        expected = in_process.get_entrypoint(module, "tensors")()
    assert list(weights) == list(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == tensor.dtype and weights[name].shape == tensor.shape, name
        assert torch.equal(weights[name], tensor), name
    weights["row"][0] = -1
    assert weights["matrix"][1, 0] == 4  # views came back as separate tensors


def test_weights_of_a_non_tensor_result_is_a_clear_error(repos):
    with pytest.raises(ResultDecodeError, match='returns="object"'):
        run_isolated(repos["pure"], "load", model="number", returns="weights", sandbox=SANDBOX)


# -- failures of the repository's code ---------------------------------------------------------


def test_exception_carries_the_remote_traceback(repos):
    with pytest.raises(RemoteError) as info:
        run_isolated(repos["pure"], "load", model="boom", sandbox=SANDBOX)
    error = info.value
    assert error.remote_type == "ValueError"
    assert 'raise ValueError("boom: the repository failed")  # the raising line' in error.remote_traceback
    assert "boom: the repository failed" in str(error)
    assert "_worker" not in error.remote_traceback  # the worker's own frames are left out


def test_exception_at_import(repos):
    with pytest.raises(RemoteError, match="broken at import") as info:
        run_isolated(repos["broken"], "list", sandbox=SANDBOX)
    assert info.value.remote_type == "ImportError"


def test_missing_entrypoint(repos):
    with pytest.raises(EntrypointNotFoundError) as info:
        run_isolated(repos["pure"], "load", model="nope", sandbox=SANDBOX)
    assert info.value.model == "nope" and isinstance(info.value, RuntimeError)


def test_missing_dependencies(repos):
    with pytest.raises(MissingDependenciesError) as info:
        run_isolated(repos["deps"], "help", model="m", sandbox=SANDBOX)
    assert info.value.missing == ["not_installed_a", "not_installed_b"]
    assert "not_installed_a" in str(info.value)


def test_missing_hubconf(repos):
    with pytest.raises(HubconfError, match="No hubconf.py"):
        run_isolated(repos["empty"], "list", sandbox=SANDBOX)


def test_required_layers_are_checked(repos):
    # Every layer this machine offers can be required; the call then runs as usual.
    from safehub._worker.sandbox import probe as layers

    available = tuple(n for n, r in layers.probe(("landlock", "seccomp", "rlimits")).items() if r["available"])
    names = run_isolated(repos["pure"], "list", sandbox=Sandbox(require=available))
    assert names == run_isolated(repos["pure"], "list", sandbox=SANDBOX) and names
    with pytest.raises(InvalidArgumentError):
        Sandbox(require=("seccomp",), layers=("landlock",))


def test_a_required_layer_the_machine_lacks_is_an_error(repos, tmp_path):
    # A real missing layer: bubblewrap, hidden from a caller whose PATH cannot find it. The call
    # must fail with SandboxError before hubconf.py runs (it would write a marker file).
    marker = tmp_path / "ran"
    repo = write_repo(tmp_path / "repo", {"hubconf.py": f"open({str(marker)!r}, 'w').close()\n"})
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "from pathlib import Path\n"
        "from safehub._run import run_isolated\n"
        "from safehub._sandbox import Sandbox\n"
        "from safehub.errors import SandboxError\n"
        "try:\n"
        f"    run_isolated(Path({str(repo)!r}), 'list', sandbox=Sandbox(require=('bubblewrap',), layers=('bubblewrap', 'namespaces')))\n"
        "except SandboxError as exc:\n"
        "    print('SandboxError', exc.layer)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path / "no-bin")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1:] == ["SandboxError bubblewrap"], done.stderr
    assert not marker.exists()


# -- what the worker sees ----------------------------------------------------------------------


def test_worker_environment_cwd_and_path(repos, monkeypatch, worker_start):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_canary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_canary")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = run_isolated(repos["pure"], "load", model="inspect", sandbox=SANDBOX)
    env = seen["env"]
    assert "GITHUB_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "canary" not in repr(env)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["HOME"] == env["TMPDIR"] == seen["cwd"] != os.getcwd()
    reaper.drain()  # the call returned with its answer; its end ran in the background
    assert not os.path.exists(seen["cwd"])  # the scratch folder is gone after the call
    # The repository's private writable view (worker/repo_view.py): its files are the repository's.
    assert seen["path"][0] == os.path.join(seen["cwd"], "repo")
    for forbidden in ("", os.getcwd(), str(Path(__file__).parent), str(Path(__file__).parents[2])):
        assert forbidden not in seen["path"]
    assert all(p.startswith((sys.prefix, sys.base_prefix)) for p in seen["path"][1:])
    assert "safehub" not in seen["modules"]
    # The zygote imports torch before it forks (DESIGN 6); a cold worker only when asked to.
    assert ("torch" in seen["modules"]) == (worker_start == "warm")
    assert len(seen["fds"]) <= 5  # stdio, the channel, and listdir's own
    assert seen["umask"] == 0o077


def test_clean_sys_path_drops_editable_finders_and_stray_entries(tmp_path):
    # An editable install of safehub adds a meta path finder (and maybe a path entry) that would
    # hand the repository safehub's parent side; the worker's clean-up drops both.
    code = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys
        spec = importlib.util.spec_from_file_location("w", {str(Path(__file__).parents[2] / "worker/main.py")!r})
        main = importlib.util.module_from_spec(spec); sys.modules["w"] = main; spec.loader.exec_module(main)
        work = importlib.import_module(main.load_package().__name__ + ".work")
        Finder = type("_EditableFinder", (), {{"__module__": "__editable___safehub_0_1_0_finder"}})
        sys.meta_path.append(Finder)
        sys.path[:0] = ["", {str(tmp_path)!r}, "/tmp"]
        work._clean_sys_path("/the/repo")
        print(repr((sys.path, Finder in sys.meta_path)))
        """
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    path, finder_kept = eval(out)
    assert path[0] == "/the/repo" and not finder_kept
    assert "" not in path and str(tmp_path) not in path and "/tmp" not in path
    assert any(p.endswith("site-packages") for p in path) and any(p.endswith("lib-dynload") for p in path)


def test_worker_output_is_relayed_and_marked(repos, capsys):
    assert run_isolated(repos["pure"], "load", model="say", sandbox=SANDBOX) == "said"
    out, err = capsys.readouterr()
    assert "[worker] hello from the repository\n" in out
    assert "[worker] no newline at the end\n" in out
    assert "[worker] and a warning\n" in err


def test_worker_output_is_capped(repos, capsys):
    assert run_isolated(repos["pure"], "load", model="shout", sandbox=SANDBOX) == "done"
    out, _ = capsys.readouterr()
    assert out.count("[worker output truncated]") == 1
    # The cap counts what reaches the caller (prefixes included), so the cut falls within a line of it.
    assert OUTPUT_CAP - 200 <= len(out.encode()) <= OUTPUT_CAP + len(OUTPUT_TRUNCATED)


# -- the worker's end: timeouts, crashes, leftovers --------------------------------------------


def test_timeout_kills_the_worker_and_its_children(repos, tmp_path):
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError) as info:
        run_isolated(repos["pure"], "load", model="spin", args=(str(pid_file),), sandbox=Sandbox(timeout=1.5, **BARE))
    assert time.monotonic() - start < 6
    assert info.value.timeout == 1.5 and isinstance(info.value, TimeoutError)
    assert not psutil.pid_exists(int(pid_file.read_text()))


def test_no_process_is_left_behind(repos):
    daemon_pid = run_isolated(repos["pure"], "load", model="daemon", sandbox=Sandbox(timeout=60, **BARE))
    assert isinstance(daemon_pid, int) and daemon_pid != os.getpid()
    reaper.settle()  # the call returned with its answer; the next one would wait for this
    assert not psutil.pid_exists(daemon_pid)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_parent_dying_takes_the_worker_tree_down(repos, tmp_path, worker_start):
    pid_file = tmp_path / "child.pid"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "from pathlib import Path\n"
        "from safehub._run import run_isolated\n"
        "from safehub._sandbox import Sandbox\n"
        f"run_isolated(Path({str(repos['pure'])!r}), 'load', model='spin', args=({str(pid_file)!r},),"
        " sandbox=Sandbox(timeout=60, layers=()))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    workers: list[psutil.Process] = []
    try:
        for _ in range(2000):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.01)
        workers = psutil.Process(parent.pid).children(recursive=True)
        # supervisor, work process, its child; and on the warm path the zygote above them (and
        # the spare worker it may have forked for the next call by now: it watches the caller too)
        assert int(pid_file.read_text()) in {p.pid for p in workers}
        assert len(workers) - 3 - (worker_start == "warm") in ((0, 2) if worker_start == "warm" else (0,))
        parent.kill()  # no finally runs in the parent: only the supervisor can clean up
        parent.wait()
        for _ in range(1000):
            if not any(_alive(p) for p in workers):
                break
            time.sleep(0.01)
        assert not any(_alive(p) for p in workers)
        # The killed caller could not remove its scratch folder; the next call does.
        left = list(Path(tempfile.gettempdir()).glob(f"safehub-worker-{parent.pid}-*"))
        assert left
        run_isolated(repos["pure"], "list", sandbox=SANDBOX)
        assert not any(p.exists() for p in left)
    finally:
        parent.kill()
        parent.wait()
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_exit_code_is_reported(repos):
    with pytest.raises(WorkerCrashedError) as info:
        run_isolated(repos["pure"], "load", model="exit3", sandbox=SANDBOX)
    assert info.value.exit_code == 3 and info.value.signal_name is None
    assert "code 3" in str(info.value)


def test_signal_is_reported(repos):
    with pytest.raises(WorkerCrashedError) as info:
        run_isolated(repos["pure"], "load", model="segv", sandbox=SANDBOX)
    assert info.value.signal_name == "SIGSEGV" and info.value.exit_code == -signal.SIGSEGV
    assert f"SIGSEGV(-{int(signal.SIGSEGV)})" in str(info.value)


def test_no_descriptor_or_thread_is_left_open_in_the_parent(repos):
    def open_fds() -> set[int]:
        return {int(n) for n in os.listdir("/proc/self/fd")}

    import threading

    fds, threads = open_fds(), threading.active_count()
    run_isolated(repos["pure"], "list", sandbox=SANDBOX)
    with pytest.raises(RemoteError):
        run_isolated(repos["pure"], "load", model="boom", sandbox=SANDBOX)
    with pytest.raises(ResultDecodeError):
        run_isolated(repos["hostile"], "load", model="unsealed_memfd", returns="weights", sandbox=UNBOUNDED)
    reaper.drain()  # the calls returned with their answers; their ends ran in the background
    assert open_fds() == fds and threading.active_count() == threads


# -- hostile replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, returns, error, match",
    [
        ("garbage", "object", ProtocolError, "magic"),
        ("huge_prefix", "object", ProtocolError, "header of 4294967295 bytes"),
        ("bad_weights_header", "weights", ResultDecodeError, "runs past|cover"),
        ("unsealed_memfd", "weights", ResultDecodeError, "not sealed"),
    ],
)
def test_hostile_replies_are_refused(repos, model, returns, error, match):
    start = time.monotonic()
    with pytest.raises(error, match=match):
        run_isolated(repos["hostile"], "load", model=model, returns=returns, sandbox=UNBOUNDED if "memfd" in model else SANDBOX)
    assert time.monotonic() - start < 10  # refused at once, never waited out


@pytest.mark.parametrize("model, error", [("forged_object", ProtocolError), ("forged_weights", ResultDecodeError)])
def test_forged_pickles_never_run_in_weights_mode(repos, tmp_path, model, error):
    canary = tmp_path / "canary"
    with pytest.raises(error):
        run_isolated(repos["hostile"], "load", model=model, args=(str(canary),), returns="weights", sandbox=SANDBOX)
    assert not canary.exists()
