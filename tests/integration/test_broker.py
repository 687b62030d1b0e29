"""Fetches brokered by the parent: what real hub repositories fetch works under isolate=True.

The worker has no network; torch.hub's downloads, nested hub loads and plain GETs are asked of
the parent, which downloads into torch.hub's layout through its own checked path and shows the
worker a read-only view. Files come from the loopback GitHub emulator's file server (the
configured GitHub endpoints are always allowed); every test runs on the cold and warm path with
every sandbox layer on.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap

import pytest
import torch

import safehub
from safehub import _trust
from safehub._egress.record import recording
from safehub.errors import OfflineError, RemoteError
from tests.local_repos import write_repo

pytestmark = pytest.mark.usefixtures("worker_start")
SANDBOX = safehub.Sandbox(timeout=120)

PRETRAINED = '''
    import os
    import torch
    from torch.hub import load_state_dict_from_url  # bound at import, as torchvision and timm do

    dependencies = ["torch"]


    def linear(pretrained=True, url=None, check_hash=False, file_name=None):
        model = torch.nn.Linear(4, 3)
        if pretrained:
            model.load_state_dict(load_state_dict_from_url(url, progress=False, check_hash=check_hash, file_name=file_name))
        return model


    def model_zoo(url):
        import torch.utils.model_zoo
        return torch.utils.model_zoo.load_url(url, progress=False)


    def working_folder(url):
        # yolov5: a download into the working folder, then torch.load of that path
        torch.hub.download_url_to_file(url, "weights.pt", progress=False)
        return torch.load("weights.pt")


    def nvidia(url):
        # NVIDIA: urlretrieve into $TORCH_HOME/checkpoints
        import urllib.request
        folder = os.path.join(torch.hub._get_torch_home(), "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(url))
        urllib.request.urlretrieve(url, path)
        return torch.load(path)


    def get(url):
        import urllib.request
        with urllib.request.urlopen(url) as response:
            return {"status": response.status, "body": response.read().decode()}


    def post(url):
        import urllib.request
        urllib.request.urlopen(url, data=b"secret")


    def with_requests(url):
        import requests
        answer = requests.get(url, timeout=5)
        return {"status": answer.status_code, "body": answer.text}


    def connect(url=None):
        import socket
        socket.create_connection(("127.0.0.1", 9), timeout=5)
'''


@pytest.fixture
def repo(tmp_path):
    path = write_repo(tmp_path / "pretrained", {"hubconf.py": PRETRAINED})
    return str(path)


@pytest.fixture
def checkpoint(github):
    """A real state dict served by the emulator's file server: (url, its tensors, its bytes)."""
    state = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.tensor([1.0, 2.0, 3.0])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    import hashlib

    name = f"linear-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    return github.add_file(name, data), state, data


def load(repo, entry, **kwargs):
    return safehub.load(repo, entry, source="local", isolate=SANDBOX, returns="weights", **kwargs)


def file_requests(github):
    return [r for r in github.requests() if r.path.startswith("/files/")]


def test_pretrained_weights_come_through_the_parent(repo, checkpoint, github, hub_dir):
    url, state, data = checkpoint
    with recording() as fetches:
        weights = load(repo, "linear", url=url, check_hash=True)
    assert all(torch.equal(weights[name], state[name]) for name in state)
    cached = hub_dir / "checkpoints" / url.rsplit("/", 1)[1]
    assert cached.read_bytes() == data  # torch.hub's layout: plain torch.hub finds the same file
    assert [(f.kind, f.url, f.size, f.cached) for f in fetches] == [("file", url, len(data), False)]
    assert len(file_requests(github)) == 1
    from safehub import _cache

    assert not list((_cache.runtime_dir() / "views").iterdir())  # the call's view is gone
    assert not (hub_dir / ".safehub" / "views").exists()  # and it never was in the hub dir


def test_a_second_load_downloads_nothing_and_plain_torch_hub_finds_the_file(repo, checkpoint, github, hub_dir, monkeypatch):
    url, state, _ = checkpoint
    load(repo, "linear", url=url)
    github.clear_log()
    with recording() as fetches:
        load(repo, "linear", url=url)
    assert file_requests(github) == [] and [f.cached for f in fetches] == [True]
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    plain = torch.hub.load_state_dict_from_url(url, progress=False)  # TORCH_HOME is the test's
    assert file_requests(github) == [] and torch.equal(plain["weight"], state["weight"])


def test_a_fresh_checkpoint_is_hashed_once_on_the_way_in(repo, checkpoint, monkeypatch):
    import hashlib

    url, _, data = checkpoint
    hashed = []
    real_file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: hashed.append(name) or real_file_digest(f, name))
    with recording() as fetches:
        load(repo, "linear", url=url)  # downloaded: hashed as the bytes arrived
        load(repo, "linear", url=url)  # cached: the sha256 remembered then
    assert [(f.cached, f.sha256) for f in fetches] == [(False, hashlib.sha256(data).hexdigest()), (True, hashlib.sha256(data).hexdigest())]
    assert hashed == []  # the file on disk was never read back to hash it


def test_offline_from_the_cache_and_a_missing_file_named(repo, checkpoint, github, monkeypatch):
    url, state, _ = checkpoint
    load(repo, "linear", url=url)
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    github.clear_log()
    assert torch.equal(load(repo, "linear", url=url)["bias"], state["bias"])
    missing = url.rsplit("/", 1)[0] + "/missing-00000000.pth"
    # The caller's setting, not the repository's failure: OfflineError (the CLI's exit 4), not RemoteError.
    with pytest.raises(OfflineError, match=r"missing-00000000.pth, which the repository fetches, is not in the cache"):
        load(repo, "linear", url=missing)
    assert github.requests() == []


def test_a_tampered_file_fails_its_hash_and_leaves_nothing(repo, github, hub_dir):
    url = github.add_file("linear-deadbeef.pth", b"not the file the name promises")
    with pytest.raises(RemoteError, match="invalid hash value|does not match|HashMismatch"):
        load(repo, "linear", url=url, check_hash=True)
    assert [p.name for p in (hub_dir / "checkpoints").iterdir() if not p.name.endswith(".lock")] == []


def test_a_download_cut_off_half_way_leaves_nothing(repo, checkpoint, github, hub_dir):
    url, _, _ = checkpoint
    github.set_fault("cut_off", server="files", times=1)
    with pytest.raises(RemoteError):
        load(repo, "linear", url=url)
    assert [p.name for p in (hub_dir / "checkpoints").iterdir() if not p.name.endswith(".lock")] == []
    load(repo, "linear", url=url)  # and the next try succeeds


@pytest.mark.parametrize("entry", ["model_zoo", "working_folder", "nvidia"])
def test_every_torch_hub_way_to_a_file(repo, checkpoint, entry, hub_dir):
    url, state, _ = checkpoint
    weights = load(repo, entry, url=url)
    assert all(torch.equal(weights[name], state[name]) for name in state)
    folder = hub_dir.parent / "checkpoints" if entry == "nvidia" else hub_dir / "checkpoints"
    assert (folder / url.rsplit("/", 1)[1]).is_file()


def test_plain_gets_through_urllib_and_requests(repo, github):
    url = github.add_file("hello.txt", b"hello from the file server")
    got = safehub.load(repo, "get", url=url, source="local", isolate=SANDBOX, trust_repo=True)
    assert got == {"status": 200, "body": "hello from the file server"}
    got = safehub.load(repo, "with_requests", url=url, source="local", isolate=SANDBOX, trust_repo=True)
    assert got == {"status": 200, "body": "hello from the file server"}


@pytest.mark.parametrize("entry", ["post", "connect"])
def test_anything_else_that_wants_the_network_names_the_setting(repo, github, entry):
    before = len(github.requests())
    with pytest.raises(RemoteError, match=r"Sandbox\(network=True\)"):
        safehub.load(repo, entry, url=github.url + "/files/x", source="local", isolate=SANDBOX, trust_repo=True)
    assert len(github.requests()) == before  # the POST's body never left


def test_fetch_false_refuses_every_fetch(repo, checkpoint, github):
    url, _, _ = checkpoint
    with pytest.raises(RemoteError, match=r"Sandbox\(fetch=False\)"):
        safehub.load(repo, "linear", url=url, source="local", isolate=safehub.Sandbox(timeout=120, fetch=False), returns="weights")
    assert file_requests(github) == []


# -- nested repositories -----------------------------------------------------------------------

INNER = '''
    import torch
    dependencies = ["torch"]

    def backbone(width=3):
        """The inner repository's backbone."""
        torch.manual_seed(0)
        return torch.nn.Linear(4, width)
'''

OUTER = '''
    import torch
    dependencies = ["torch"]

    def model(inner="{inner}", nested_skip=False):
        backbone = torch.hub.load(inner, "backbone", width=5, skip_validation=nested_skip)
        return torch.nn.Sequential(backbone, torch.nn.ReLU())

    def names(inner="{inner}"):
        return torch.hub.list(inner)

    def doc(inner="{inner}"):
        return torch.hub.help(inner, "backbone")

    def local_outside(path):
        return torch.hub.load(path, "anything", source="local")
'''


@pytest.fixture
def nested(make_repo, tmp_path):
    make_repo("someone", "inner", {"hubconf.py": textwrap.dedent(INNER)})
    return str(write_repo(tmp_path / "outer", {"hubconf.py": OUTER.format(inner="someone/inner")}))


def test_a_nested_repository_goes_through_the_pipeline(nested, github, hub_dir):
    weights = safehub.load(nested, "model", source="local", isolate=SANDBOX, returns="weights")
    torch.manual_seed(0)
    expected = torch.nn.Linear(4, 5)
    assert torch.equal(weights["0.weight"], expected.weight.detach())
    assert any(p.name.startswith("someone_inner_main") for p in hub_dir.iterdir())  # the parent's cache
    _trust.add("someone", "inner")  # list and help answer objects: the nested code needs trust then
    assert safehub.load(nested, "names", source="local", isolate=SANDBOX, trust_repo=True) == ["backbone"]
    assert safehub.load(nested, "doc", source="local", isolate=SANDBOX, trust_repo=True) == "The inner repository's backbone."


def test_a_nested_fork_commit_is_refused_unless_the_nested_call_skips_validation(make_repo, github, tmp_path):
    make_repo("someone", "inner", {"hubconf.py": textwrap.dedent(INNER)})
    fork_sha = github.add_fork_commit("someone", "inner", {"hubconf.py": textwrap.dedent(INNER)})
    outer = str(write_repo(tmp_path / "outer", {"hubconf.py": OUTER.format(inner=f"someone/inner:{fork_sha}")}))
    with pytest.raises(RemoteError, match="cannot be loaded"):
        safehub.load(outer, "model", source="local", isolate=SANDBOX, returns="weights")
    assert safehub.load(outer, "model", nested_skip=True, source="local", isolate=SANDBOX, returns="weights")


def test_an_untrusted_nested_repository_is_refused_in_object_mode(nested, github):
    # The object's code, the nested repository's included, reaches this process: trust is asked
    # for the nested repository too, and with no terminal the error names it.
    with pytest.raises(RemoteError, match="someone/inner"):
        safehub.load(nested, "model", source="local", isolate=SANDBOX, returns="object", trust_repo=True)


def test_a_trusted_nested_repository_comes_back_whole_in_object_mode(nested, github):
    _trust.add("someone", "inner")
    model = safehub.load(nested, "model", source="local", isolate=SANDBOX, returns="object", trust_repo=True)
    assert isinstance(model, torch.nn.Sequential) and model[0].out_features == 5
    assert not any(name == "hubconf" or name.startswith("someone") for name in sys.modules)


def test_a_nested_local_load_stays_inside_the_repository(nested, tmp_path):
    elsewhere = write_repo(tmp_path / "elsewhere", {"hubconf.py": "def anything():\n    return 1\n"})
    with pytest.raises(RemoteError, match="inside the repository's own folder"):
        safehub.load(nested, "local_outside", path=str(elsewhere), source="local", isolate=SANDBOX, trust_repo=True)


# -- private folders as root -------------------------------------------------------------------

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root's worker drops to another uid; the root run covers it")


@ROOT_ONLY
def test_a_private_local_folder_loads_as_it_does_in_process(tmp_path):
    private = tmp_path / "private"
    write_repo(private, {"hubconf.py": "dependencies = []\ndef hi():\n    return 'hi from a private folder'\n"})
    private.chmod(0o700)  # what mktemp -d and tempfile.mkdtemp() make
    assert safehub.load(str(private), "hi", source="local", trust_repo=True) == "hi from a private folder"
    assert safehub.load(str(private), "hi", source="local", isolate=SANDBOX, trust_repo=True) == "hi from a private folder"
    assert oct(private.stat().st_mode & 0o777) == "0o700"  # the caller's folder is left as it was


@ROOT_ONLY
def test_what_the_sandbox_cannot_read_is_named(tmp_path):
    from safehub._run import run_isolated
    from safehub.errors import HubconfError

    private = write_repo(tmp_path / "private", {"hubconf.py": "dependencies = []\n"})
    private.chmod(0o700)
    with pytest.raises(HubconfError, match=r"cannot read .*hubconf.py: permission denied to uid 65534"):
        run_isolated(private, "list", sandbox=SANDBOX)  # no view to copy it into


# -- lock files pin what a load fetches --------------------------------------------------------

LOCKED = '''
    import torch
    from torch.hub import load_state_dict_from_url

    dependencies = ["torch"]


    def net(url, inner="someone/inner"):
        backbone = torch.hub.load(inner, "backbone", width=3)
        backbone.load_state_dict(load_state_dict_from_url(url, progress=False))
        return backbone
'''


@pytest.fixture
def locked_setup(make_repo, github, checkpoint, tmp_path):
    make_repo("someone", "inner", {"hubconf.py": textwrap.dedent(INNER)})
    make_repo("someone", "outer", {"hubconf.py": textwrap.dedent(LOCKED)})
    url, state, data = checkpoint
    lock = tmp_path / "safehub.lock"
    from safehub import cli

    assert cli.main(["lock", "someone/outer", "--load", "net", "--arg", f"url={url}", "--output", str(lock)]) == 0
    return url, state, lock


def test_lock_load_pins_nested_repositories_and_files(locked_setup):
    import json

    url, state, lock = locked_setup
    pinned = json.loads(lock.read_text())
    assert set(pinned["repos"]) == {"someone/outer", "someone/inner"}
    assert list(pinned["files"]) == [url] and pinned["files"][url]["size"] > 0
    weights = safehub.load("someone/outer", "net", url=url, isolate=SANDBOX, returns="weights", lock=str(lock))
    assert torch.equal(weights["weight"], state["weight"])


def test_a_locked_load_refuses_a_file_it_does_not_pin(locked_setup, github):
    url, _, lock = locked_setup
    other = github.add_file("other-00000000.pth", b"not reviewed")
    with pytest.raises(RemoteError, match="the lock file pins no file at"):
        safehub.load("someone/outer", "net", url=other, isolate=SANDBOX, returns="weights", lock=str(lock))
    assert [r for r in github.requests() if r.path.endswith("other-00000000.pth")] == []  # no way out through URLs


def test_a_locked_load_catches_a_changed_file_at_the_same_url(locked_setup, github, hub_dir):
    url, _, lock = locked_setup
    name = url.rsplit("/", 1)[1]
    (hub_dir / "checkpoints" / name).unlink()  # not in the cache: it is fetched again
    github.add_file(name, b"the server now serves something else")
    with pytest.raises(RemoteError, match="invalid hash value"):
        safehub.load("someone/outer", "net", url=url, isolate=SANDBOX, returns="weights", lock=str(lock))
    assert not (hub_dir / "checkpoints" / name).exists()  # never moved into place
    # and a file changed in the cache is caught before the worker sees it
    (hub_dir / "checkpoints" / name).write_bytes(b"changed in the cache")
    with pytest.raises(RemoteError, match="is not the file the lock file pins"):
        safehub.load("someone/outer", "net", url=url, isolate=SANDBOX, returns="weights", lock=str(lock))


# -- repositories that write into their own folder -----------------------------------------------

SILERO = '''
    import os
    import torch

    dependencies = ["torch"]


    def model(url):
        # silero-models: checkpoints downloaded under the repository's own folder
        folder = os.path.join(os.path.dirname(__file__), "src", "model")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "weights.pt")
        if not os.path.exists(path):
            torch.hub.download_url_to_file(url, path, progress=False)
        return torch.load(path)
'''


def test_a_repository_that_writes_into_its_own_folder_gets_a_private_view(tmp_path, checkpoint, hub_dir):
    url, state, _ = checkpoint
    repo = write_repo(tmp_path / "silero", {"hubconf.py": SILERO})
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    weights = load(str(repo), "model", url=url)
    assert all(torch.equal(weights[name], state[name]) for name in state)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # the repository never changed
    assert (hub_dir / "checkpoints" / url.rsplit("/", 1)[1]).is_file()  # the file went to the cache


# -- parallel jobs share one download ------------------------------------------------------------

_PARALLEL_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    ready, go, repo, url = sys.argv[1:5]
    import safehub
    open(ready, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    weights = safehub.load(repo, "linear", url=url, source="local", isolate=safehub.Sandbox(timeout=300), returns="weights")
    print(json.dumps({k: v.tolist() for k, v in weights.items()}))
    """
)


@pytest.mark.slow
def test_parallel_isolated_loads_download_a_checkpoint_once(repo, checkpoint, github, tmp_path, worker_start):
    import json
    import subprocess
    import time

    # Eight cold jobs; two warm ones (each process starts its own zygote: eight would only add load).
    jobs = 8 if worker_start == "cold" else 2
    url, state, _ = checkpoint
    github.set_fault("slow", server="files", delay=0.05)  # the download outlasts every job's start
    go = tmp_path / "go"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", _PARALLEL_CHILD, str(tmp_path / f"ready{i}"), str(go), repo, url],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(jobs)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(jobs)) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (out, err), p in zip(outputs, procs):
        assert p.returncode == 0, err.decode()[-2000:]
        assert json.loads(out.decode().strip().splitlines()[-1]) == {k: v.tolist() for k, v in state.items()}
    assert len(file_requests(github)) == 1
