"""Remote models on a Ray cluster of two nodes on this machine (README "Ray").

One cluster for the module: two real ``ray start --block`` processes (a head and a second node,
one CPU each, a small object store, no dashboard, every port chosen free, a temporary folder of
their own so a root run and a user run never meet). Ray replaces a loopback node address with
the machine's own address; the traffic still never leaves the machine.

What the README's recipe promises, checked where Ray runs it: a remote model loaded in an actor's
``__init__`` (on each node) and in a ``map_batches`` class gives the outputs of the model run in
this process; every sandbox layer is active inside Ray's worker processes (the doctor report
from an actor, and the worker's own ``/proc`` status read by the actor), and the model cannot
reach the cluster (its GCS port, its raylet socket); killing an actor, or stopping the cluster,
leaves none of the actor's processes behind; a handle sent to another process fails with an
error that says to load the model there.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.resource_tracker
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Imported before Ray starts its threads here: run alone, this module otherwise ended (Python 3.11.7)
# with hypothesis' plugin importing hypothesis at the session's end, rewritten by pytest through
# ast.parse, which failed with "AST constructor recursion depth mismatch" (in 3.11 the ast module
# counts recursion for all threads at once).
import hypothesis  # noqa: F401
import numpy as np
import psutil
import pytest
import ray
import torch

import safehub
from safehub._sandbox import KNOWN_LAYERS, Sandbox
from tests.local_repos import write_repo
from tests.process_trees import all_gone
from tests.remote_models import models_in_process, write_models_repo

pytestmark = [
    pytest.mark.timeout(600),
    # Ray's own import-time and shutdown notices are not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
NODES = ("safehub_head", "safehub_second")  # a custom resource per node, to place actors on each
NOBODY = 65534  # the uid a root parent drops its workers to (safehub/_bwrap.py)
SANDBOX_TIMEOUT = 120

PROBE = '''
    import os
    import socket

    import torch

    dependencies = ["torch"]


    class Probe:
        def __call__(self, x):
            return x * 2

        def eval(self):
            return self

        def reach_tcp(self, host, port):
            """What a connection to host:port gives this model: "connected" or the error."""
            try:
                with socket.create_connection((host, port), timeout=5):
                    return "connected"
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"

        def reach_unix(self, path):
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(path)
                    return "connected"
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"


        def env(self, name):
            return os.environ.get(name)


    def probe():
        return Probe()
'''


# -- the cluster ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    """Two ``ray start --block`` processes and everything they started; this process is its driver."""

    temp_dir: Path
    address: str = ""
    starters: list[subprocess.Popen] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)  # NODES name -> Ray node id
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def start_node(self, name: str, env: dict[str, str], *args: str) -> None:
        own = self.temp_dir / name
        own.mkdir()
        argv = [str(RAY), "start", "--block", "--num-cpus", "1", "--object-store-memory", str(80 << 20),
                "--resources", f'{{"{name}": 1}}', "--dashboard-agent-listen-port", str(free_port()), *args]
        log = open(own / "ray-start.log", "wb")  # noqa: SIM115 (closed with the cluster)
        self.starters.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster now: the starters and their descendants (Ray's workers too)."""
        found = []
        for starter in self.starters:
            with contextlib.suppress(psutil.NoSuchProcess):
                top = psutil.Process(starter.pid)
                found += [top, *top.children(recursive=True)]
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
        return found

    def raylet_socket(self, name: str) -> str:
        """The unix socket the raylet of node ``name`` serves (Ray numbers them: raylet, raylet.1)."""
        top = psutil.Process(self.starters[NODES.index(name)].pid)
        for proc in top.children(recursive=True):
            for arg in proc.cmdline():
                if arg.startswith("--raylet_socket_name="):
                    return arg.split("=", 1)[1]
        raise LookupError(f"no raylet under {top}")

    def stop(self) -> None:
        """SIGTERM to each ``ray start --block`` (it drains and stops its node), then SIGKILL to what is left."""
        began = time.monotonic()
        self.processes()
        with contextlib.suppress(Exception):
            ray.shutdown()
        for starter in reversed(self.starters):
            if starter.poll() is None:
                starter.send_signal(signal.SIGTERM)
        for starter in self.starters:
            with contextlib.suppress(subprocess.TimeoutExpired):
                starter.wait(timeout=60)
        for proc in self.seen.values():  # psutil checks the start time: never another process
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        for starter in self.starters:
            if starter.poll() is None:
                starter.kill()
                starter.wait()
        print(f"\nRay cluster stopped in {time.monotonic() - began:.1f} s")


def cluster_env(temp_dir: Path, settings: dict[str, str]) -> dict[str, str]:
    """What Ray's workers inherit: this tree importable (the test's actor classes), a hub dir of
    their own, the auth mode, no token or other secret, GitHub nowhere (the tests load local repositories)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GITHUB_", "SAFEHUB_", "HF_"))}
    env.update(settings, PYTHONPATH=str(ROOT), TORCH_HOME=str(temp_dir / "torch_home"),
               SAFEHUB_GITHUB_URL="http://127.0.0.1:9", SAFEHUB_GITHUB_API_URL="http://127.0.0.1:9",
               # SIGTERM stops a node at once, as `ray stop` does, instead of draining it for Ray Serve for 30 s.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    return env


def wait_for(what: str, check, cluster: Cluster, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if any(starter.poll() is not None for starter in cluster.starters):
            break
        time.sleep(0.2)
    logs = "\n".join((p / "ray-start.log").read_text(errors="replace")[-2000:] for p in cluster.temp_dir.iterdir()
                     if (p / "ray-start.log").exists())
    raise RuntimeError(f"the Ray cluster did not come up: {what}\n{logs}")


@pytest.fixture(scope="module")
def cluster():
    # A short folder of its own in /tmp: Ray's socket paths must fit in 108 bytes, and a root
    # run and a user run each get their own (never Ray's shared /tmp/ray).
    temp_dir = Path(tempfile.mkdtemp(prefix="shray-"))
    # No token: the worst case, where whatever reaches the cluster's ports can run code on it (the
    # model must not). Said explicitly, for the nodes and this driver: else a ~/.ray/auth_token that
    # any local ray.init() on the machine writes turns token auth on in some processes only.
    # No usage reports either (Ray Data's would query a Prometheus on localhost:9090 and log each refusal).
    settings = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USAGE_DISABLED": "1"}
    env = cluster_env(temp_dir, settings)
    started = time.monotonic()
    found = Cluster(temp_dir)
    patch = pytest.MonkeyPatch()
    for name, value in settings.items():
        patch.setenv(name, value)
    patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    try:
        found.start_node(NODES[0], env, "--head", "--port", str(free_port()), "--include-dashboard=false",
                         "--dashboard-port", str(free_port()),
                         "--temp-dir", str(temp_dir), "--disable-usage-stats")
        address_file = temp_dir / "ray_current_cluster"
        found.address = wait_for("the head's address", lambda: address_file.exists() and address_file.read_text().strip(),
                                 found)
        found.start_node(NODES[1], env, "--address", found.address)
        ray.init(address=found.address, logging_level="WARNING", log_to_driver=False)

        def both_nodes():
            alive = {name: node["NodeID"] for node in ray.nodes() if node["Alive"]
                     for name in NODES if name in node["Resources"]}
            return alive if len(alive) == 2 else None

        found.node_ids = wait_for("both nodes alive", both_nodes, found)
        print(f"\nRay cluster of two nodes up in {time.monotonic() - started:.1f} s at {found.address}")
        yield found
    finally:
        found.stop()
        patch.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- what runs in Ray's workers ------------------------------------------------------------------


def load_remote(repo: str, model: str, **kwargs):
    """The README's recipe: load in the process that calls, never send the handle."""
    return safehub.load(repo, model, source="local", isolate=Sandbox(timeout=SANDBOX_TIMEOUT), returns="remote", **kwargs)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


class ModelActor:
    """A Ray actor that keeps one remote model (the README's actor recipe)."""

    def __init__(self, repo: str, model: str, kwargs: dict):
        self.model = load_remote(repo, model, **kwargs).eval()

    def forward(self, *args):
        return self.model(*args)

    def call(self, method: str, *args):
        return self.model.call(method, *args)

    def where(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def descendants(self) -> list[int]:
        """This Ray worker's processes: the warm zygote, the model's supervisor and its sandboxed worker."""
        return [p.pid for p in psutil.Process().children(recursive=True)]

    def doctor(self) -> dict:
        return safehub.sandbox_report()

    def worker_status(self) -> dict:
        """The model's worker seen from this Ray worker: its /proc status and namespaces, and this one's."""
        tree = [self.model.pid, *(p.pid for p in psutil.Process(self.model.pid).children(recursive=True))]
        own_ns = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "net", "pid", "ipc", "mnt")}
        seen = {}
        for pid in tree:
            with contextlib.suppress(OSError):
                ns = {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in own_ns}
                seen[pid] = {"status": proc_status(pid), "ns": ns}
        return {"self": {"status": proc_status(os.getpid()), "ns": own_ns}, "tree": seen}


class RemoteBatches:
    """The README's ``map_batches`` recipe: the model loaded once per actor, called per batch."""

    def __init__(self, repo: str):
        self.model = load_remote(repo, "convnet").eval()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        logits = self.model(torch.tensor(batch["image"]))  # Ray's arrays are read-only; torch wants its own
        return {"id": batch["id"], "logits": logits.numpy(), "node": np.array([self.node] * len(batch["id"]))}


def call_in_task(handle):  # a Ray task given a handle: must never run
    return handle(torch.zeros(1))


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory) -> Path:
    # World-readable, so Ray's workers and the sandbox (uid 65534 under root) read it in place.
    root = Path(tempfile.mkdtemp(prefix="shray-models-"))
    root.chmod(0o755)
    repo = write_models_repo(root / "repo")
    write_repo(root / "probe", {"hubconf.py": PROBE})
    yield repo
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_repo(models_repo) -> Path:
    return models_repo.parent / "probe"


@pytest.fixture(scope="module")
def actors(cluster, models_repo):
    """One ModelActor (the convnet) pinned to each node."""
    actor_class = ray.remote(num_cpus=0)(ModelActor)
    handles = {name: actor_class.options(resources={name: 0.01}).remote(str(models_repo), "convnet", {})
               for name in NODES}
    yield handles
    kill_unless_stopped(*handles.values())


@pytest.fixture(scope="module")
def probe_actor(cluster, probe_repo):
    """A ModelActor with the probe model, on the second node."""
    handle = ray.remote(num_cpus=0)(ModelActor).options(resources={NODES[1]: 0.01}).remote(str(probe_repo), "probe", {})
    yield handle
    kill_unless_stopped(handle)


def kill_unless_stopped(*handles) -> None:
    # After the cluster is stopped, ray.kill would start a local Ray instance to kill in.
    if ray.is_initialized():
        for handle in handles:
            ray.kill(handle)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def in_process(repo: Path, model: str, x: torch.Tensor) -> torch.Tensor:
    with models_in_process(repo) as hubconf:
        with torch.inference_mode():
            return getattr(hubconf, model)().eval()(x)


# -- tests ---------------------------------------------------------------------------------------


def test_actors_on_both_nodes_give_the_in_process_outputs(cluster, actors, models_repo):
    x = images(4)
    expected = in_process(models_repo, "convnet", x)
    places = ray.get([actors[name].where.remote() for name in NODES])
    assert [place["node"] for place in places] == [cluster.node_ids[name] for name in NODES]
    for name in NODES:
        out = ray.get(actors[name].forward.remote(x))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert ray.get(actors[name].call.remote("predict", x)) == ray.get(actors[NODES[0]].call.remote("predict", x))


def test_every_sandbox_layer_is_active_in_rays_workers(cluster, actors):
    here = safehub.sandbox_report()
    for name in NODES:
        report = ray.get(actors[name].doctor.remote())
        assert set(report) == set(KNOWN_LAYERS)
        # The same layers as in this process, and none of the ones this machine offers is missing.
        assert {k: v["active"] for k, v in report.items()} == {k: v["active"] for k, v in here.items()}
        inactive = {k for k, v in report.items() if v["available"] and not v["active"]}
        assert not inactive, report
        assert report["landlock"]["active"] and report["seccomp"]["active"] and report["rlimits"]["active"]


def test_the_models_worker_in_a_ray_worker_is_confined(cluster, actors):
    for name in NODES:
        seen = ray.get(actors[name].worker_status.remote())
        own = seen["self"]
        assert own["status"]["Seccomp"].strip() == "0"  # Ray's worker itself is not confined
        confined = [p for p in seen["tree"].values() if p["status"]["Seccomp"].strip() == "2"]
        assert confined, seen
        for proc in confined:
            status = proc["status"]
            assert status["NoNewPrivs"].strip() == "1"
            uid = int(status["Uid"].split()[0])
            assert uid == (NOBODY if os.geteuid() == 0 else os.geteuid())
            # Its own user (whatever capabilities it has hold only there), network, pid and ipc
            # namespaces: not the Ray worker's.
            for ns in ("user", "net", "pid", "ipc"):
                assert proc["ns"][ns] != own["ns"][ns], (ns, proc)
            assert len(status["NSpid"].split()) >= 2  # it has a pid inside its own pid namespace


def test_a_model_in_a_ray_worker_cannot_reach_the_cluster(cluster, probe_actor):
    gcs_port = int(cluster.address.rsplit(":", 1)[1])
    raylet = cluster.raylet_socket(NODES[1])
    # The canaries are real: the GCS answers on loopback, and the raylet's socket accepts a connection.
    with socket.create_connection(("127.0.0.1", gcs_port), timeout=5):
        pass
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(raylet)
    for host in ("127.0.0.1", cluster.address.rsplit(":", 1)[0]):
        assert ray.get(probe_actor.call.remote("reach_tcp", host, gcs_port)) != "connected"
    assert ray.get(probe_actor.call.remote("reach_unix", raylet)) != "connected"
    assert ray.get(probe_actor.call.remote("env", "RAY_AUTH_MODE")) is None  # Ray's environment stays out
    torch.testing.assert_close(ray.get(probe_actor.forward.remote(torch.ones(3))), torch.full((3,), 2.0))


def test_map_batches_gives_the_in_process_outputs(cluster, models_repo):
    x = images(32, seed=1)
    expected = in_process(models_repo, "convnet", x)
    rows = [{"id": i, "image": x[i].numpy()} for i in range(len(x))]
    dataset = ray.data.from_items(rows, override_num_blocks=4)
    # Two actors of one CPU each on two nodes of one CPU each: one actor a node, and both must have
    # loaded the model (each its own sandboxed worker) before the first batch. Which of them gets
    # which batch is Ray's choice (it favours the actor beside the blocks).
    context = ray.data.DataContext.get_current()
    saved, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
    try:
        out = dataset.map_batches(RemoteBatches, fn_constructor_args=(str(models_repo),), batch_size=8,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1).take_all()
    finally:
        context.wait_for_min_actors_s = saved
    assert sorted(row["id"] for row in out) == list(range(len(x)))
    for row in out:
        torch.testing.assert_close(torch.tensor(row["logits"]), expected[row["id"]], rtol=0, atol=0)
    assert {row["node"] for row in out} <= set(cluster.node_ids.values())


@contextlib.contextmanager
def resource_tracker_stopped():
    """A spawn start launches multiprocessing's resource tracker before it pickles anything, and the
    tracker lives as long as this process: later modules that count this process's children
    (test_warm, test_transport) would find it. Stop the one this block started."""
    tracker = multiprocessing.resource_tracker._resource_tracker
    running_before = tracker._pid is not None
    try:
        yield
    finally:
        if not running_before:
            tracker._stop()


def test_a_handle_sent_to_another_process_fails_and_says_to_load_it_there(cluster, models_repo):
    advice = "load the model in the process that calls it"
    with load_remote(str(models_repo), "convnet") as handle:
        with pytest.raises(TypeError) as in_a_task:
            ray.get(ray.remote(call_in_task).remote(handle))
        # Ray's own message quotes ours, and ours is its cause.
        assert advice in str(in_a_task.value) and advice in str(in_a_task.value.__cause__)
        with pytest.raises(TypeError, match=advice):
            ray.put(handle)
        child = multiprocessing.get_context("spawn").Process(target=call_in_task, args=(handle,))
        with pytest.raises(TypeError, match=advice), resource_tracker_stopped():
            child.start()
        # Nothing was sent, nothing broke: the handle still works here.
        assert handle(images(1)).shape == (1, 10)


def test_killing_an_actor_leaves_none_of_its_processes(cluster, probe_actor):
    ray_worker = psutil.Process(ray.get(probe_actor.where.remote())["pid"])
    processes = [psutil.Process(pid) for pid in ray.get(probe_actor.descendants.remote())]
    assert any(p.uids().real == (NOBODY if os.geteuid() == 0 else os.geteuid()) for p in processes)
    ray.kill(probe_actor)
    assert all_gone([ray_worker, *processes], timeout=30), [p for p in processes if p.is_running()]


def test_stopping_the_cluster_leaves_no_sandboxed_process(cluster, actors):
    """Last: it stops the module's cluster (the fixture's teardown then has nothing left to do)."""
    processes = []
    for name in NODES:
        processes.append(psutil.Process(ray.get(actors[name].where.remote())["pid"]))
        processes += [psutil.Process(pid) for pid in ray.get(actors[name].descendants.remote())]
    assert len(processes) > 2
    cluster.stop()
    assert all_gone(processes, timeout=30), [p for p in processes if p.is_running()]
    assert all_gone(list(cluster.seen.values()), timeout=30)
