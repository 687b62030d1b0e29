"""Remote models (``returns="remote"``): real workers keep the model, calls cross as data.

Corpus-like models (``tests/remote_models.py``: a conv net, a UNet, a language model with
several outputs and ``generate``) give the same outputs remote as in-process on the same inputs,
on the cold and the warm path. A probe model covers the rest: every kind of data both ways,
errors that keep the model, eval/train and inference mode forwarded, threads, two branches side
by side, and every way a handle ends (close, ``with``, garbage collection, exit, the caller's
death, a fork). The attacks by hostile models are in ``tests/security/test_remote_attacks.py``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import gc
import math
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

import safehub
from safehub._run.session import close_all
from safehub._sandbox import Sandbox
from safehub.errors import InvalidArgumentError, RemoteClosedError, RemoteError, ResultDecodeError
from tests.local_repos import write_repo
from tests.process_trees import alive, all_gone, tree_of
from tests.remote_models import models_in_process, write_models_repo

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
SANDBOX = Sandbox(timeout=120)

PROBE = '''
    import os
    import sys
    import time

    import torch

    dependencies = ["torch"]


    class Probe:
        def __call__(self, *args, **kwargs):
            return {"args": args, "kwargs": kwargs}

        def echo(self, value):
            return value

        def mode(self):
            return {"inference": torch.is_inference_mode_enabled(), "grad": torch.is_grad_enabled()}

        def grad(self, x):
            """The gradient of sum(x**2): autograd inside the call."""
            x = x.clone().requires_grad_(True)
            (x ** 2).sum().backward()
            return x.grad

        def mutate(self, x):
            x.add_(100)  # the worker's own copy
            return x

        def ones(self, n):
            return torch.ones(n)

        def fail(self, text):
            raise ValueError(text)

        def unsendable(self):
            return {"fine": 1, "bad": {1, 2}}

        def pid(self):
            return os.getpid()

        def sleep(self, seconds):
            time.sleep(seconds)
            return seconds


    def probe():
        return Probe()
'''


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory) -> Path:
    return write_models_repo(tmp_path_factory.mktemp("remote-models") / "repo")


@pytest.fixture(scope="module")
def probe_repo(tmp_path_factory) -> Path:
    return write_repo(tmp_path_factory.mktemp("remote-probe") / "repo", {"hubconf.py": PROBE})


@contextlib.contextmanager
def start_path(path: str):
    """SAFEHUB_WARM for module-scoped handles (``worker_start`` is per test)."""
    saved = os.environ.get("SAFEHUB_WARM")
    os.environ["SAFEHUB_WARM"] = "1" if path == "warm" else "0"
    try:
        if path == "warm" and not safehub.warmup():
            pytest.skip("the warm zygote cannot start on this machine")
        yield
    finally:
        if saved is None:
            os.environ.pop("SAFEHUB_WARM", None)
        else:
            os.environ["SAFEHUB_WARM"] = saved


def load_remote(repo: Path, model: str, sandbox: Sandbox = SANDBOX, **kwargs):
    return safehub.load(str(repo), model, source="local", isolate=sandbox, returns="remote", **kwargs)


@pytest.fixture(scope="module", params=["cold", "warm"])
def remote_models(request, models_repo):
    """The three models, remote, on one start path for the whole module."""
    with start_path(request.param):
        handles = {name: load_remote(models_repo, name) for name in ("convnet", "unet", "tiny_lm")}
    yield handles
    for handle in handles.values():
        handle.close()


@pytest.fixture(scope="module")
def local_models(models_repo):
    """The same three models, built in this process (the repository's modules forgotten afterwards)."""
    with models_in_process(models_repo) as hubconf:
        yield {name: getattr(hubconf, name)() for name in ("convnet", "unet", "tiny_lm")}


@pytest.fixture(scope="module")
def probe(probe_repo):
    with start_path("warm"):
        handle = load_remote(probe_repo, "probe")
    yield handle
    handle.close()


def processes_of(handle) -> list[psutil.Process]:
    return tree_of(handle.pid)


def in_process(model, method: str, *args, **kwargs):
    with torch.inference_mode():
        return getattr(model, method)(*args, **kwargs) if method != "__call__" else model(*args, **kwargs)


def assert_same(remote_value, local_value):
    """The same data: tensors close (one machine, one torch: equal up to thread scheduling)."""
    if isinstance(local_value, torch.Tensor):
        assert isinstance(remote_value, torch.Tensor)
        torch.testing.assert_close(remote_value, local_value, rtol=1e-5, atol=1e-6)
    elif dataclasses.is_dataclass(local_value):
        assert_same(remote_value, {f.name: getattr(local_value, f.name) for f in dataclasses.fields(local_value)})
    elif isinstance(local_value, dict):
        assert type(remote_value) is dict and list(remote_value) == list(local_value)
        for key in local_value:
            assert_same(remote_value[key], local_value[key])
    elif isinstance(local_value, (list, tuple)):
        assert type(remote_value) is (list if isinstance(local_value, list) else tuple)
        assert len(remote_value) == len(local_value)
        for r, l in zip(remote_value, local_value):
            assert_same(r, l)
    elif isinstance(local_value, float):
        assert remote_value == pytest.approx(local_value, rel=1e-5)
    else:
        assert remote_value == local_value


CASES = [
    ("convnet", "__call__", (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)),), {}),
    ("convnet", "predict", (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)),), {"top": 2}),
    ("unet", "__call__", (torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)),), {}),
    ("unet", "encode", (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)),), {}),
    ("tiny_lm", "__call__", (torch.tensor([[1, 5, 7, 2]]),), {"labels": torch.tensor([[5, 7, 2, 9]])}),
    ("tiny_lm", "generate", (torch.tensor([[3, 1, 4]]),), {"max_new_tokens": 6}),
    ("tiny_lm", "generate", (torch.tensor([[3, 1, 4]]),), {"max_new_tokens": 4, "return_scores": True}),
]


@pytest.mark.parametrize("name, method, args, kwargs", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_outputs_match_in_process(remote_models, local_models, name, method, args, kwargs):
    remote, local = remote_models[name], local_models[name]
    assert remote.eval() is remote
    local.eval()
    got = remote(*args, **kwargs) if method == "__call__" else getattr(remote, method)(*args, **kwargs)
    assert_same(got, in_process(local, method, *args, **kwargs))


def test_several_outputs_come_back_as_plain_containers(remote_models):
    out = remote_models["tiny_lm"](torch.tensor([[1, 2, 3]]))
    # A dataclass output is a dict of its fields; its tuple stays a tuple.
    assert type(out) is dict and list(out) == ["logits", "hidden_states", "loss"]
    assert type(out["hidden_states"]) is tuple and len(out["hidden_states"]) == 3 and out["loss"] is None
    generated = remote_models["tiny_lm"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, return_scores=True)
    assert type(generated) is tuple and generated[0].shape == (1, 5) and len(generated[1]) == 3  # a namedtuple's values


def test_state_dict_matches_in_process(remote_models, local_models):
    for name in ("convnet", "unet", "tiny_lm"):
        remote_state, local_state = remote_models[name].state_dict(), local_models[name].state_dict()
        assert list(remote_state) == list(local_state)
        for key, tensor in local_state.items():
            assert torch.equal(remote_state[key], tensor), key


def test_train_and_eval_are_forwarded(remote_models):
    convnet = remote_models["convnet"]
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    convnet.train()
    # Dropout is on in training mode: two calls differ.
    assert not torch.equal(convnet(x), convnet(x))
    convnet.eval()
    assert torch.equal(convnet(x), convnet(x))


def test_a_large_result_is_private_memory_of_the_caller(remote_models):
    """A result that did not fit the result pool comes in sealed memfds, mapped privately; later
    ones are copied out of the pool into the caller's own regions (``tests/integration/test_pools.py``)."""
    for _ in range(2):
        out = remote_models["unet"](torch.rand(2, 3, 128, 128))  # 128 KiB out
        line = _mapping_of(out)
        # Private either way: the worker can write neither into the caller's copy-on-write pages.
        assert line.split()[1] == "rw-p", line
        # Without a memory cgroup the worker may create no memfds: an unpooled result travels
        # inline, in the frame (SECURITY.md, "One memory bound").
        assert "memfd:safehub-values" in line or line.split()[4] == "0", line
        out.mul_(0)
        assert float(out.sum()) == 0


def _mapping_of(tensor: torch.Tensor) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            begin, end = (int(x, 16) for x in line.split()[0].split("-"))
            if begin <= tensor.data_ptr() < end:
                return line
    pytest.fail("the result's memory is in no mapping")


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Box:
    corner: tuple
    label: str


def test_every_kind_of_data_round_trips(probe):
    big = torch.arange(100_000, dtype=torch.float64)  # 800 KB: through a memfd
    value = {
        "none": None, "bools": [True, False], "int": -(2**70), "float": 2.5, "nan": math.nan,
        "inf": (math.inf, -math.inf), "str": "naïve ☃", "bytes": b"\x00\xffdata", "empty": ([], (), {}),
        "nested": [[[{"deep": (1, [2, {"deeper": "yes"}])}]]],
        "tensors": [torch.ones(2, 3, dtype=dtype) for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                                 torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)],
        "bool_tensor": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "no_elements": torch.empty(0, 4),
        "transposed": torch.arange(12.0).view(3, 4).t(), "big": big,
    }
    got = probe.echo(value)
    assert list(got) == list(value)
    for key in ("none", "bools", "int", "float", "inf", "str", "bytes", "empty", "nested"):
        assert got[key] == value[key], key
    assert math.isnan(got["nan"])
    for got_tensor, sent in zip(got["tensors"], value["tensors"]):
        assert got_tensor.dtype == sent.dtype and torch.equal(got_tensor, sent)
    for key in ("bool_tensor", "scalar", "no_elements", "transposed", "big"):
        assert got[key].dtype == value[key].dtype and torch.equal(got[key], value[key]), key


def test_other_containers_come_back_plain(probe):
    got = probe.echo([Point(1, 2), torch.Size([3, 4]), collections.OrderedDict(b=1, a=2), Box((0, 0), "cat"),
                      Color.RED.value, Level.HIGH])
    assert got == [(1, 2), (3, 4), {"b": 1, "a": 2}, {"corner": (0, 0), "label": "cat"}, "red", 3]
    assert [type(item) for item in got] == [tuple, tuple, dict, dict, str, int]


def test_arguments_by_position_and_keyword(probe):
    assert probe(1, "two", three=[3]) == {"args": (1, "two"), "kwargs": {"three": [3]}}


def test_calls_run_in_inference_mode_unless_asked(probe):
    assert probe.mode() == {"inference": True, "grad": False}
    probe.inference_mode = False
    try:
        assert probe.mode() == {"inference": False, "grad": True}
        assert torch.equal(probe.grad(torch.tensor([1.0, -2.0])), torch.tensor([2.0, -4.0]))
    finally:
        probe.inference_mode = True


def test_the_model_cannot_change_the_callers_tensor(probe):
    x = torch.zeros(3)
    big = torch.zeros(200_000)  # through a memfd
    assert probe.mutate(x).tolist() == [100.0] * 3
    assert float(probe.mutate(big).min()) == 100.0
    assert x.tolist() == [0.0] * 3 and float(big.abs().max()) == 0.0


def test_an_exception_in_the_model_keeps_the_model(probe):
    with pytest.raises(RemoteError, match="fail\\(\\) raised ValueError: no luck") as info:
        probe.fail("no luck")
    assert "raise ValueError(text)" in info.value.remote_traceback
    assert probe.echo(1) == 1 and not probe.closed


def test_what_is_not_data_is_refused_and_the_model_stays(probe):
    with pytest.raises(InvalidArgumentError, match=r"argument 0\['k'\]: a set is not data"):
        probe.echo({"k": {1, 2}})
    with pytest.raises(InvalidArgumentError, match="argument 'value': a function is not data"):
        probe.echo(value=lambda: 1)
    with pytest.raises(InvalidArgumentError, match=r"argument 0: a tensor that is complex \(complex64\)"):
        probe.echo(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(InvalidArgumentError, match="nested deeper than 32"):
        deep: list = []
        for _ in range(40):
            deep = [deep]
        probe.echo(deep)
    with pytest.raises(ResultDecodeError, match=r"unsendable\(\) cannot be sent: result\['bad'\]: a set is not data"):
        probe.unsendable()
    with pytest.raises(AttributeError, match="no public method or attribute 'missing'"):
        probe.missing()
    with pytest.raises(AttributeError):
        probe.call("_private")
    assert probe.echo("still here") == "still here"


def test_handle_basics(probe):
    assert {"echo", "generate"} & set(probe.methods) == {"echo"}
    assert "echo" in dir(probe) and "safehub.RemoteModule 'probe' (Probe)" in repr(probe)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(probe)


def test_threads_share_one_handle(probe):
    errors: list[BaseException] = []
    results: dict[int, list] = {}

    def worker(n: int) -> None:
        try:
            results[n] = [probe.echo(torch.full((4,), float(n * 100 + i))).tolist() for i in range(20)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {n: [[float(n * 100 + i)] * 4 for i in range(20)] for n in range(6)}


def net_source(op: str, scale: float) -> str:
    return (
        "import torch\n\n\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        f"        self.scale = torch.nn.Parameter(torch.full((3,), {scale}))\n\n"
        f"    def forward(self, x):\n        return x {op} self.scale\n"
    )


def test_two_branches_side_by_side(make_repo, hub_dir):
    repo = make_repo("acme", "twins", {
        "hubconf.py": "dependencies = ['torch']\nfrom models.net import Net\n\n\ndef net():\n    return Net()\n",
        "models/__init__.py": "",
        "models/net.py": net_source("+", 2.0),
    })
    repo.checkout("dev", create=True)
    repo.commit("dev: multiply", files={"models/net.py": net_source("*", 3.0)})
    repo.checkout("main")
    x = torch.ones(3)
    # No trust given: with returns="remote" no code of the repository runs here.
    with safehub.load("acme/twins:main", "net", isolate=SANDBOX, returns="remote") as main, \
            safehub.load("acme/twins:dev", "net", isolate=SANDBOX, returns="remote") as dev:
        assert main.pid != dev.pid
        for _ in range(3):
            assert main(x).tolist() == [3.0] * 3 and dev(x).tolist() == [3.0] * 3
            assert main(x * 2).tolist() == [4.0] * 3 and dev(x * 2).tolist() == [6.0] * 3
    # Nothing of either branch was ever imported here.
    assert not [n for n, m in list(sys.modules.items()) if str(getattr(m, "__file__", "")).startswith(str(hub_dir))]


@pytest.mark.usefixtures("worker_start")
def test_close_ends_the_worker_and_later_calls_say_why(probe_repo):
    remote = load_remote(probe_repo, "probe")
    assert remote.echo(1) == 1
    processes = processes_of(remote)
    remote.close()
    assert remote.closed and remote.pid is None and all_gone(processes)
    with pytest.raises(RemoteClosedError, match="'probe' is gone: the handle was closed") as info:
        remote.echo(1)
    assert info.value.reason == "the handle was closed"
    remote.close()  # again: nothing happens


@pytest.mark.usefixtures("worker_start")
def test_with_block_and_garbage_collection_end_the_worker(probe_repo):
    with load_remote(probe_repo, "probe") as remote:
        processes = processes_of(remote)
    assert remote.closed and all_gone(processes)
    remote = load_remote(probe_repo, "probe")
    processes = processes_of(remote)
    del remote
    gc.collect()
    assert all_gone(processes)


def test_close_from_another_thread_cuts_a_running_call(probe_repo):
    remote = load_remote(probe_repo, "probe")
    processes = processes_of(remote)
    threading.Timer(0.5, remote.close).start()
    with pytest.raises(RemoteClosedError, match="closed while a call was running"):
        remote.sleep(60)
    assert all_gone(processes)


def test_idle_timeout_ends_the_worker(probe_repo):
    remote = load_remote(probe_repo, "probe", Sandbox(timeout=60, idle_timeout=1.0))
    processes = processes_of(remote)
    assert remote.sleep(1.5) == 1.5  # a call counts as activity, however long
    assert all_gone(processes, timeout=30)
    with pytest.raises(RemoteClosedError, match=r"sat idle for 1 s \(Sandbox\(idle_timeout=...\)\)"):
        remote.echo(1)


def test_lifetime_ends_the_worker_even_during_a_call(probe_repo):
    remote = load_remote(probe_repo, "probe", Sandbox(timeout=60, lifetime=2.0))
    processes = processes_of(remote)
    with pytest.raises(RemoteClosedError, match=r"lifetime of 2 s ran out"):
        remote.sleep(60)
    assert all_gone(processes)


def test_a_forked_child_cannot_use_the_handle_and_does_not_end_it(probe):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit, never pytest's teardown
        try:
            probe.echo(1)
            answer = b"called"
        except RemoteClosedError as exc:
            answer = b"refused" if "forked child" in str(exc) else b"other"
        except BaseException:
            answer = b"crashed"
        probe.close()
        os.write(write_end, answer)
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 16) == b"refused" and status == 0
    os.close(read_end)
    assert probe.echo("parent") == "parent" and not probe.closed


CALLER = """
import sys, time
sys.path.insert(0, {root!r})
import safehub
remote = safehub.load({repo!r}, "probe", source="local", isolate=True, returns="remote")
remote.echo(1)
print(remote.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(120)
"""


@pytest.mark.usefixtures("worker_start")
@pytest.mark.parametrize("how", ["exit", "killed"])
def test_the_worker_goes_when_the_caller_ends(probe_repo, how):
    code = CALLER.format(root=str(ROOT), repo=str(probe_repo))
    caller = subprocess.Popen([sys.executable, "-c", code, "wait" if how == "killed" else "exit"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    processes: list[psutil.Process] = []
    try:
        supervisor = int(caller.stdout.readline())
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(supervisor)
            processes = [top, *top.children(recursive=True)]
        if how == "killed":
            assert processes and all(alive(p) for p in processes)
            caller.kill()  # no finally, no atexit: only the supervisor watching the caller can clean up
        caller.wait(timeout=60)
        assert how == "killed" or caller.returncode == 0
        assert all_gone(processes)
    finally:
        caller.kill()
        caller.wait()
        caller.stdout.close()
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_close_all_at_exit_closes_every_handle(probe_repo):
    remotes = [load_remote(probe_repo, "probe") for _ in range(2)]
    processes = [p for remote in remotes for p in processes_of(remote)]
    close_all()
    assert all(remote.closed for remote in remotes) and all_gone(processes)


def test_settings_are_checked_before_any_worker_starts(probe_repo):
    for bad in ({"idle_timeout": 0}, {"lifetime": -1.0}, {"idle_timeout": "10"}, {"lifetime": math.inf}):
        with pytest.raises(InvalidArgumentError, match="positive number of seconds"):
            Sandbox(**bad)
    with pytest.raises(InvalidArgumentError, match="returns='remote' needs isolate=True"):
        safehub.load(str(probe_repo), "probe", source="local", returns="remote")
