"""A pin covers everything that runs: a locked operation checks the cached tree before any code runs.

The attack (issue 16): the cached ``hubconf.py`` of a pinned repository is edited after it was
pinned (a poisoned CI cache, a job that edited it). The edit appends a line that fills the
model's weights with 666, and writes a canary file when it is imported. A locked load must never
run it: online it fetches the pinned archive again; offline (or read-only) it refuses, exit 5.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
import torch

import safehub
from safehub import _api, _cache, _pins, _tree, cli
from safehub.errors import RemoteError, TreeChangedError

HUBCONF = """\
import torch

dependencies = ["torch"]


def net():
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, 1.0)
    return model


def nested_net():
    return torch.hub.load("acme/inner:main", "net", trust_repo=True)
"""

SANDBOX = safehub.Sandbox(timeout=120)


def tamper(repo_dir, canary) -> None:
    with open(repo_dir / "hubconf.py", "a") as f:
        # The canary shows the edited code ran in this process (a sandboxed worker cannot write it).
        f.write(f"\ntry:\n    open({str(canary)!r}, 'w').close()\nexcept OSError:\n    pass\n_net = net\n\n\ndef net():\n"
                "    model = _net()\n    torch.nn.init.constant_(model.weight, 666.0)\n    return model\n")


@pytest.fixture
def repo(make_repo):
    make_repo("acme", "inner", {"hubconf.py": HUBCONF})
    return make_repo("acme", "models", {"hubconf.py": HUBCONF, "pkg/util.py": "X = 1\n"})


@pytest.fixture
def lock(repo, github, tmp_path):
    pins = dict([_api.pin("acme/models:main"), _api.pin("acme/inner:main")])
    path = tmp_path / "safehub.lock"
    path.write_text(_pins.dumps(pins))
    return path


def cached_dir(spec: str):
    from safehub import _refs

    return _cache.lookup(_refs.parse(spec)).repo_dir


def weights(**kw):
    return safehub.load("acme/models:main", "net", isolate=SANDBOX, returns="weights", **kw)


def test_lock_pins_the_digest_of_the_tree_its_archive_extracts_to(lock, repo, github, tmp_path):
    pin = _pins.read(lock)["acme/models:main"]
    assert len(pin.tree_sha256) == 64
    # Computable from the archive alone: the same digest without extracting anything.
    with urllib.request.urlopen(f"{github.url}/acme/models/zipball/{pin.commit_sha}", timeout=30) as response:
        (tmp_path / "a.zip").write_bytes(response.read())
    assert _tree.of_zip(tmp_path / "a.zip").digest == pin.tree_sha256
    assert _tree.of_dir(cached_dir("acme/models:main")).digest == pin.tree_sha256


def test_online_an_edited_tree_is_fetched_again_and_never_runs(lock, repo, github, tmp_path, caplog):
    canary = tmp_path / "canary"
    tamper(cached_dir("acme/models:main"), canary)
    with caplog.at_level("WARNING", logger="safehub"):
        state = weights(lock=lock)
    assert torch.equal(state["weight"], torch.ones(2, 2))
    assert not canary.exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "~ hubconf.py" in messages and "fetching the pinned archive again" in messages
    assert "Replaced the changed tree" in messages
    assert "666" not in (cached_dir("acme/models:main") / "hubconf.py").read_text()


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "in-process"])
def test_offline_an_edited_tree_is_refused_before_any_code_runs(lock, repo, tmp_path, monkeypatch, isolate):
    canary = tmp_path / "canary"
    tamper(cached_dir("acme/models:main"), canary)
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    calls = [
        lambda: safehub.load("acme/models:main", "net", isolate=SANDBOX if isolate else False,
                             returns="weights" if isolate else "object", trust_repo=True, lock=lock),
        lambda: safehub.list("acme/models:main", isolate=SANDBOX if isolate else False, trust_repo=True, lock=lock),
        lambda: safehub.help("acme/models:main", "net", isolate=SANDBOX if isolate else False, trust_repo=True, lock=lock),
    ]
    for call in calls:
        with pytest.raises(TreeChangedError, match=r"~ hubconf\.py") as info:
            call()
        assert info.value.changes == ["~ hubconf.py"]
        assert "SAFEHUB_OFFLINE" not in info.value.message or "offline" in info.value.message
        assert "cache fill" in info.value.message
    assert not canary.exists()


def test_an_added_or_removed_file_is_a_change(lock, repo, monkeypatch):
    root = cached_dir("acme/models:main")
    (root / "pkg" / "evil.py").write_text("import os\n")
    (root / "pkg" / "util.py").unlink()
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    with pytest.raises(TreeChangedError) as info:
        weights(lock=lock)
    assert info.value.changes == ["+ pkg/evil.py", "- pkg/util.py"]


def test_a_lock_file_older_than_tree_pins_checks_the_record(lock, repo, tmp_path, monkeypatch):
    data = _pins.read(lock)
    old = {key: _pins.Pin(p.ref, p.commit_sha, p.archive_sha256) for key, p in data.items()}
    old_lock = tmp_path / "old.lock"
    old_lock.write_text(_pins.dumps(old))
    assert "tree_sha256" not in old_lock.read_text()
    assert torch.equal(weights(lock=old_lock)["weight"], torch.ones(2, 2))
    canary = tmp_path / "canary"
    tamper(cached_dir("acme/models:main"), canary)
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    with pytest.raises(TreeChangedError, match=r"~ hubconf\.py"):
        weights(lock=old_lock)
    assert not canary.exists()


def test_unlocked_loads_keep_torch_hub_behaviour(lock, repo, tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    tamper(cached_dir("acme/models:main"), canary)
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    # No lock, no pin: a cached folder is used as it is, as torch.hub does.
    assert torch.equal(weights()["weight"], torch.full((2, 2), 666.0))


def test_a_nested_locked_load_of_an_edited_tree_is_refused(lock, repo, tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    safehub.load("acme/models:main", "nested_net", isolate=SANDBOX, returns="weights", lock=lock)
    tamper(cached_dir("acme/inner:main"), canary)
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    with pytest.raises(RemoteError, match=r"not the tree the lock file pins"):
        safehub.load("acme/models:main", "nested_net", isolate=SANDBOX, returns="weights", lock=lock)
    assert not canary.exists()


def test_a_warm_cache_reads_no_file_to_verify(lock, repo, monkeypatch):
    weights(lock=lock)
    read = []
    real = _tree._file_sha256
    monkeypatch.setattr(_tree, "_file_sha256", lambda path: read.append(path) or real(path))
    weights(lock=lock)
    assert read == [], "every file's stamp was unchanged: nothing is hashed again"
    # A file rewritten with its old size and mtime still shows: its ctime changed.
    hubconf = cached_dir("acme/models:main") / "hubconf.py"
    st = hubconf.stat()
    text = hubconf.read_text()
    hubconf.write_text(text.replace("1.0", "6.0"))
    os.utime(hubconf, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    with pytest.raises(TreeChangedError):
        weights(lock=lock)


def test_cli_locked_load_of_an_edited_tree_exits_5(lock, repo, tmp_path):
    canary = tmp_path / "canary"
    tamper(cached_dir("acme/models:main"), canary)
    env = {**os.environ, "SAFEHUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "safehub", "load", "acme/models:main", "net", "--locked", str(lock),
                           "-o", str(tmp_path / "w.safetensors")], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == cli.EXIT_INTEGRITY, proc.stderr
    assert "hubconf.py" in proc.stderr and "cache fill" in proc.stderr
    assert not canary.exists() and not (tmp_path / "w.safetensors").exists()
    proc = subprocess.run([sys.executable, "-m", "safehub", "cache", "verify", "--locked", str(lock)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.EXIT_INTEGRITY and "not the pinned tree" in proc.stdout
