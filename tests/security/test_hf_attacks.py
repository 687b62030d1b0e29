"""Attacks on the Hugging Face Hub path: a hostile worker, and a hostile or broken Hub.

The worker asks the broker for Hub files directly over its channel, as hostile code can; the Hub
stand-in (``tests/hf_hub_emulator.py``) forges answers where the Hub itself is the attacker. Each
test checks that the attack ran (the worker's account of every attempt comes back, or the
stand-in's log) and that its canary is untouched: files outside the Hugging Face cache, the
token, a loopback listener, the cache's own blob.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from safetensors.torch import save

import safehub
from safehub._egress import hf as _hf
from safehub.errors import InvalidArgumentError
from tests.local_repos import write_repo
from tests.loopback_servers import Canary

SANDBOX = safehub.Sandbox(timeout=120)
DATA = save({"w": __import__("torch").ones(2)})

HOSTILE = '''
    import os
    import sys

    dependencies = []


    def _ask(what, args):
        channel = sys.modules["_safehub_worker.work"].channel()
        try:
            return ["answered", channel.ask(what, args)[0]]
        except Exception as exc:
            return ["refused", f"{type(exc).__name__}: {exc}"]


    def ask_each(what, many):
        return [_ask(what, args) for args in many]


    def tamper(repo_id):
        _, value = _ask("hf_file", {"repo_id": repo_id, "filename": "model.safetensors"})
        path = value["path"]
        attempts = {}
        for name, attempt in {
            "write": lambda: open(path, "r+b").write(b"tampered"),
            "unlink": lambda: os.unlink(path),
            "create": lambda: open(os.path.join(os.path.dirname(path), "planted.safetensors"), "wb").write(b"x"),
        }.items():
            try:
                attempt()
                attempts[name] = "done"
            except OSError as exc:
                attempts[name] = f"denied: {exc.errno}"
        return attempts


    def peek(paths):
        seen = {}
        for path in paths:
            try:
                seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read()
            except OSError as exc:
                seen[path] = f"denied: {exc.errno}"
        return seen
'''


@pytest.fixture
def hostile(tmp_path):
    return str(write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE}))


def run(repo, entry, **kwargs):
    return safehub.load(repo, entry, source="local", isolate=SANDBOX, trust_repo=True, **kwargs)


def outside(hf_cache):
    """Every file under the Hugging Face home that is not inside its cache: the canary set."""
    home = hf_cache.parent
    return sorted(str(p) for p in home.rglob("*") if hf_cache not in p.parents and p != hf_cache) if home.exists() else []


@pytest.mark.usefixtures("worker_start")
def test_paths_and_names_that_leave_the_cache_are_refused(hostile, hf_hub, hf_cache):
    hf_hub.add_repo("org/tiny", {"model.safetensors": DATA})
    asks = [
        {"repo_id": "org/tiny", "filename": "../../../../escaped"},
        {"repo_id": "org/tiny", "filename": "model.safetensors", "subfolder": "../.."},
        {"repo_id": "org/tiny", "filename": "/etc/passwd"},
        {"repo_id": "../org/tiny", "filename": "model.safetensors"},
        {"repo_id": "org--x/tiny", "filename": "model.safetensors"},
        {"repo_id": "org/tiny", "filename": "model.safetensors", "revision": "../../refs/x"},
        {"repo_id": "org/tiny", "filename": "model.safetensors", "repo_type": "../x"},
        {"repo_id": "org/tiny", "filename": "model.safetensors", "endpoint": "file:///etc"},
    ]
    outcomes = run(hostile, "ask_each", what="hf_file", many=asks)
    assert [o[0] for o in outcomes] == ["refused"] * len(asks), outcomes
    assert hf_hub.requests() == [] and outside(hf_cache) == []


def test_the_worker_cannot_change_what_it_was_served(hostile, hf_hub, hf_cache):
    hf_hub.add_repo("org/tiny", {"model.safetensors": DATA})
    attempts = run(hostile, "tamper", repo_id="org/tiny")
    assert attempts and all(value.startswith("denied") for value in attempts.values()), attempts
    blob = hf_cache / "models--org--tiny" / "blobs" / hashlib.sha256(DATA).hexdigest()
    assert blob.read_bytes() == DATA


def test_the_token_stays_in_the_parent_and_with_the_endpoint(hostile, hf_hub, hf_cache, monkeypatch):
    token_file = hf_cache.parent / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("hf_file_token")
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    with pytest.raises(InvalidArgumentError, match="may not pass HF_TOKEN"):
        safehub.Sandbox(env=("HF_TOKEN",))
    hf_hub.add_repo("org/tiny", {"model.safetensors": DATA})
    # A repository names another endpoint (here the CDN's origin, allowed): it never gets the token.
    outcomes = run(hostile, "ask_each", what="hf_file",
                   many=[{"repo_id": "org/tiny", "filename": "model.safetensors", "endpoint": hf_hub.cdn_url}])
    assert outcomes[0][0] == "answered"  # the CDN answers no Hub metadata: an error for the worker to raise
    assert [(r.origin, r.authorization) for r in hf_hub.requests()] == [("cdn", None)]
    seen = run(hostile, "peek", paths=[str(token_file), str(hf_cache.parent)])
    assert all(str(value).startswith("denied") for value in seen.values()), seen


def test_a_hub_redirect_to_a_private_address_is_refused(hostile, hf_hub, hf_cache):
    canary = Canary("127.0.0.2")
    try:
        hf_hub.forge("/org/evil/resolve/main/model.safetensors", 302, {
            "X-Repo-Commit": "a" * 40, "X-Linked-Etag": f'"{"b" * 64}"', "X-Linked-Size": "4",
            "Location": f"http://127.0.0.2:{canary.port}/latest/meta-data"})
        outcomes = run(hostile, "ask_each", what="hf_file", many=[{"repo_id": "org/evil", "filename": "model.safetensors"}])
        assert outcomes[0][0] == "refused" and "127.0.0.2 is a loopback address" in outcomes[0][1], outcomes
        assert canary.connections() == 0
    finally:
        canary.close()
    assert [r.method for r in hf_hub.requests()] == ["HEAD"]
    assert not list(hf_cache.rglob("blobs/*"))


@pytest.mark.parametrize("etag", ['"../../../../escaped"', '"a/b"', '".hidden"', ""])
def test_a_hub_answer_without_a_hex_etag_writes_nothing(hostile, hf_hub, hf_cache, etag):
    hf_hub.forge("/org/evil/resolve/main/model.safetensors", 200, {"X-Repo-Commit": "a" * 40, "ETag": etag})
    outcomes = run(hostile, "ask_each", what="hf_file", many=[{"repo_id": "org/evil", "filename": "model.safetensors"}])
    assert outcomes[0][0] == "answered" and "did not answer like a Hugging Face Hub" in outcomes[0][1]["message"], outcomes
    assert not list(hf_cache.rglob("*")) or not list(hf_cache.rglob("blobs/*"))
    assert outside(hf_cache) == []


def test_a_huge_snapshot_is_cut_at_the_cap(hostile, hf_hub, hf_cache, monkeypatch):
    monkeypatch.setattr(_hf, "MAX_SNAPSHOT_FILES", 3)
    hf_hub.add_repo("org/many", {f"f{i}.txt": b"x" for i in range(5)})
    outcomes = run(hostile, "ask_each", what="hf_snapshot", many=[{"repo_id": "org/many"}])
    assert outcomes[0][0] == "answered" and "more than 3 one snapshot may fetch" in outcomes[0][1]["message"], outcomes
    assert not [r for r in hf_hub.requests() if "/resolve/" in r.path]
    assert os.path.isdir(hf_cache) is False or not list(hf_cache.rglob("blobs/*"))
