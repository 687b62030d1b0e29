"""The Hugging Face Hub's download path under isolate=True, against the real huggingface_hub.

A loopback Hub stand-in (``tests/hf_hub_emulator.py``: the resolve endpoint, a CDN origin behind
a 302, the API) serves a small safetensors checkpoint. Repositories come from the GitHub
emulator; their entrypoints call ``hf_hub_download``, ``snapshot_download``, and requests and
httpx directly. The parent fetches into the user's Hugging Face cache, which plain
huggingface_hub in this process then shares.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap

import huggingface_hub
import pytest
import torch
from safetensors.torch import save

import safehub
from safehub._egress import record as _broker
from safehub.errors import RemoteError

SANDBOX = safehub.Sandbox(timeout=120)
STATE = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.tensor([1.0, 2.0, 3.0])}
WEIGHTS = save(STATE)

HUBCONF = '''
    import os
    import torch

    dependencies = ["torch", "huggingface_hub"]


    def _linear(path):
        from safetensors.torch import load_file
        model = torch.nn.Linear(4, 3)
        model.load_state_dict(load_file(path))
        return model


    def hf_file(repo_id="org/tiny", filename="model.safetensors", revision=None, subfolder=None, local_files_only=False):
        from huggingface_hub import hf_hub_download
        return _linear(hf_hub_download(repo_id, filename, revision=revision, subfolder=subfolder,
                                       local_files_only=local_files_only, cache_dir=None))


    def hf_snapshot(repo_id="org/tiny", revision=None, allow_patterns=None):
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        if allow_patterns is None:
            assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"], os.listdir(folder)
        return _linear(os.path.join(folder, "model.safetensors"))


    def head_then_get(url):
        # fairseq: requests HEAD for the ETag, then a GET of the body
        import requests
        head = requests.head(url, allow_redirects=True, timeout=10)
        body = requests.Session().get(url, timeout=10).content
        return {"status": torch.tensor([head.status_code]), "body": torch.frombuffer(bytearray(body), dtype=torch.uint8),
                "etag": torch.frombuffer(bytearray(head.headers["ETag"].encode()), dtype=torch.uint8)}


    def with_httpx(url):
        import httpx
        with httpx.Client(follow_redirects=True) as client:
            head = client.head(url)
            body = client.get(url).content
        return {"status": torch.tensor([head.status_code]), "body": torch.frombuffer(bytearray(body), dtype=torch.uint8)}


    def environment():
        names = ["HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"]
        return {name: torch.tensor([name in os.environ]) for name in names} | {
            "endpoint": torch.frombuffer(bytearray(os.environ.get("HF_ENDPOINT", "").encode() or b"-"), dtype=torch.uint8)}


    def post(url):
        import requests
        requests.post(url, data=b"secret", timeout=10)


    def httpx_post(url):
        import httpx
        httpx.post(url, content=b"secret")


    def udp(url):
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"secret", ("127.0.0.1", 9))


    def curl(url):
        import subprocess
        subprocess.run(["curl", "-o", "/tmp/x", url], check=True)
'''


@pytest.fixture
def tiny(hf_hub):
    """org/tiny on the stand-in: a config (a plain git file) and a safetensors checkpoint (LFS, behind the CDN)."""
    commit = hf_hub.add_repo("org/tiny", {"config.json": b'{"in": 4, "out": 3}', "model.safetensors": WEIGHTS})
    return commit


@pytest.fixture
def repo(make_repo):
    make_repo("someone", "hfnets", {"hubconf.py": textwrap.dedent(HUBCONF)})
    return "someone/hfnets"


def load(repo, entry, returns="weights", isolate=SANDBOX, **kwargs):
    return safehub.load(repo, entry, isolate=isolate, returns=returns, **kwargs)


def same(weights):
    return all(torch.equal(weights[name], STATE[name]) for name in STATE)


def gets(hub, origin=None):
    """The GETs of repository files and listings (huggingface_hub 2 also asks the Hub other things once)."""
    return [r for r in hub.requests(origin) if r.method == "GET" and (r.origin == "cdn" or "/resolve/" in r.path or "/api/models/" in r.path)]


@pytest.mark.usefixtures("worker_start")
def test_hf_hub_download_lands_in_the_users_hugging_face_cache(repo, tiny, hf_hub, hf_cache):
    with _broker.recording() as fetches:
        assert same(load(repo, "hf_file"))
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    folder = hf_cache / "models--org--tiny"
    snapshot = folder / "snapshots" / tiny / "model.safetensors"
    # huggingface_hub's layout: a relative link into blobs/<etag>, and refs/main -> the commit
    assert os.readlink(snapshot) == f"../../blobs/{sha256}" and (folder / "blobs" / sha256).read_bytes() == WEIGHTS
    assert (folder / "refs" / "main").read_text() == tiny
    assert [(f.kind, f.hub_file, f.commit_sha, f.sha256, f.size, f.cached) for f in fetches] == [
        ("hf", ("model", "org/tiny", "main", "model.safetensors"), tiny, sha256, len(WEIGHTS), False)]
    # the body came from the CDN (the 302's target), and plain huggingface_hub here finds the file offline
    assert [r.origin for r in gets(hf_hub)] == ["cdn"]
    found = huggingface_hub.hf_hub_download("org/tiny", "model.safetensors", cache_dir=hf_cache, local_files_only=True)
    assert os.path.realpath(found) == os.path.realpath(snapshot)
    assert huggingface_hub.try_to_load_from_cache("org/tiny", "model.safetensors", cache_dir=hf_cache) == str(snapshot)
    assert [r.repo_id for r in huggingface_hub.scan_cache_dir(hf_cache).repos] == ["org/tiny"]


def test_a_second_load_downloads_nothing_and_plain_huggingface_hub_neither(repo, tiny, hf_hub, hf_cache):
    load(repo, "hf_file")
    hf_hub.clear_log()
    with _broker.recording() as fetches:
        assert same(load(repo, "hf_file"))
    assert gets(hf_hub) == [] and [f.cached for f in fetches] == [True]
    huggingface_hub.hf_hub_download("org/tiny", "model.safetensors", cache_dir=hf_cache, endpoint=hf_hub.endpoint)
    assert gets(hf_hub) == []  # online, huggingface_hub asks for the etag and finds the blob the parent wrote


def test_what_huggingface_hub_cached_is_served_without_a_download(repo, tiny, hf_hub, hf_cache):
    huggingface_hub.snapshot_download("org/tiny", cache_dir=hf_cache, endpoint=hf_hub.endpoint)
    hf_hub.clear_log()
    assert same(load(repo, "hf_snapshot"))
    assert same(load(repo, "hf_file", revision=tiny))
    assert gets(hf_hub, "cdn") == [] and [r.path for r in gets(hf_hub)] == ["/api/models/org/tiny/revision/main"]


@pytest.mark.parametrize("setting", ["SAFEHUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_serves_the_cache_with_no_network(repo, tiny, hf_hub, monkeypatch, setting):
    load(repo, "hf_snapshot")
    monkeypatch.setenv(setting, "1")
    hf_hub.clear_log()
    assert same(load(repo, "hf_file")) and same(load(repo, "hf_snapshot"))
    plain = huggingface_hub.snapshot_download("org/tiny", cache_dir=os.environ["HF_HOME"] + "/hub", local_files_only=True)
    assert sorted(os.listdir(plain)) == ["config.json", "model.safetensors"]
    with pytest.raises(RemoteError, match=rf"LocalEntryNotFoundError: org/tiny@main/other.safetensors is not in the Hugging Face cache .* {setting}"):
        load(repo, "hf_file", filename="other.safetensors")
    assert hf_hub.requests() == []


def test_local_files_only_never_asks_the_hub(repo, tiny, hf_hub):
    with pytest.raises(RemoteError, match="LocalEntryNotFoundError: .*local_files_only=True"):
        load(repo, "hf_file", local_files_only=True)
    load(repo, "hf_file")
    hf_hub.clear_log()
    assert same(load(repo, "hf_file", local_files_only=True)) and hf_hub.requests() == []


def test_snapshot_download_with_a_revision_and_patterns(repo, tiny, hf_hub, hf_cache):
    newer = hf_hub.commit("org/tiny", {"model.safetensors": save({k: v + 1 for k, v in STATE.items()}), "extra.bin": b"x"})
    hf_hub.tag("org/tiny", "v1", tiny)
    assert newer != tiny
    assert same(load(repo, "hf_snapshot", revision="v1", allow_patterns=["*.safetensors"]))
    folder = hf_cache / "models--org--tiny"
    assert (folder / "refs" / "v1").read_text() == tiny
    assert sorted(os.listdir(folder / "snapshots" / tiny)) == ["model.safetensors"]
    assert not any(r.path.endswith("extra.bin") for r in hf_hub.requests())


def test_a_subfolder_and_a_commit_revision(repo, hf_hub, hf_cache):
    commit = hf_hub.add_repo("org/nested", {"weights/model.safetensors": WEIGHTS})
    assert same(load(repo, "hf_file", repo_id="org/nested", subfolder="weights", revision=commit))
    assert (hf_cache / "models--org--nested" / "snapshots" / commit / "weights" / "model.safetensors").is_file()
    assert not (hf_cache / "models--org--nested" / "refs").exists()  # a commit needs no ref


def test_a_missing_file_raises_huggingface_hubs_own_error(repo, tiny, hf_hub):
    with pytest.raises(RemoteError, match="RemoteEntryNotFoundError: 'nope.safetensors' is not in org/tiny at main"):
        load(repo, "hf_file", filename="nope.safetensors")
    with pytest.raises(RemoteError, match="RepositoryNotFoundError"):
        load(repo, "hf_file", repo_id="org/missing")
    with pytest.raises(RemoteError, match="RevisionNotFoundError"):
        load(repo, "hf_file", revision="no-such-branch")


@pytest.mark.usefixtures("worker_start")
def test_remote_mode_runs_the_model_built_from_hub_weights(repo, tiny, hf_hub):
    with load(repo, "hf_file", returns="remote") as model:
        out = model(torch.ones(2, 4))
    assert torch.allclose(out, torch.ones(2, 4) @ STATE["weight"].T + STATE["bias"])


def test_in_process_control_with_plain_huggingface_hub(repo, tiny, hf_hub, hf_in_process):
    model = load(repo, "hf_file", returns="object", isolate=False, trust_repo=True)
    assert torch.equal(model.weight.detach(), STATE["weight"])
    hf_hub.clear_log()
    assert same(load(repo, "hf_file"))  # the isolated load finds what the in-process one cached
    assert gets(hf_hub) == []


# -- requests and httpx ------------------------------------------------------------------------


@pytest.mark.usefixtures("worker_start")
@pytest.mark.parametrize("entry", ["head_then_get", "with_httpx"])
def test_requests_and_httpx_head_and_get_through_the_parent(repo, tiny, hf_hub, entry):
    url = hf_hub.resolve_url("org/tiny", "model.safetensors")
    got = load(repo, entry, url=url)
    assert got["status"].tolist() == [200] and bytes(got["body"].tolist()) == WEIGHTS
    # the HEAD's redirect went back to the client, which followed it: HEAD on both origins
    assert [(r.origin, r.method) for r in hf_hub.requests() if r.method == "HEAD"] == [("hub", "HEAD"), ("cdn", "HEAD")]


@pytest.mark.parametrize(("entry", "named"), [("post", "requests POST"), ("httpx_post", "httpx POST")])
def test_other_methods_are_refused_by_name(repo, hf_hub, entry, named):
    with pytest.raises(RemoteError, match=rf"only GET and HEAD go through the parent, not {named} .*Sandbox\(network=True\)"):
        load(repo, entry, url=hf_hub.endpoint + "/upload")
    assert hf_hub.requests() == []


def test_a_socket_seccomp_refuses_is_refused_with_a_message(repo, hf_hub):
    with pytest.raises(RemoteError, match=r"PermissionError: .*safehub: no socket of this kind .*Sandbox\(network=True\)"):
        load(repo, "udp", url=hf_hub.endpoint)


def test_starting_curl_is_refused_with_a_message(repo, hf_hub):
    with pytest.raises(RemoteError, match=r"PermissionError: .*safehub: the sandbox starts no programs \(curl -o"):
        load(repo, "curl", url=hf_hub.endpoint + "/x")
    assert hf_hub.requests() == []


# -- policy, token, pins -----------------------------------------------------------------------


def test_a_loopback_endpoint_needs_the_allow_list_and_the_refusal_names_it(repo, tiny, hf_hub, monkeypatch):
    endpoint, cdn = hf_hub.hosts
    monkeypatch.delenv("SAFEHUB_ALLOW_HOSTS")
    with pytest.raises(RemoteError, match=rf"127.0.0.1 is a loopback address.*SAFEHUB_ALLOW_HOSTS={endpoint}"):
        load(repo, "hf_file")
    assert hf_hub.requests() == []
    # the CDN is a fetch like any other: the endpoint alone on the list does not let it through
    monkeypatch.setenv("SAFEHUB_ALLOW_HOSTS", endpoint)
    with pytest.raises(RemoteError, match=rf"SAFEHUB_ALLOW_HOSTS={cdn}.*where the Hub sends org/tiny@main/model.safetensors"):
        load(repo, "hf_file")
    assert hf_hub.requests("cdn") == []


def test_the_token_goes_to_the_endpoint_only_and_never_to_the_worker(repo, hf_hub, monkeypatch):
    hf_hub.token = "hf_secret_token"
    hf_hub.add_repo("org/private", {"model.safetensors": WEIGHTS, "config.json": b"{}"}, private=True)
    with pytest.raises(RemoteError, match="RepositoryNotFoundError"):
        load(repo, "hf_file", repo_id="org/private")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    hf_hub.clear_log()
    assert same(load(repo, "hf_snapshot", repo_id="org/private"))
    seen = {(r.origin, r.authorization) for r in hf_hub.requests()}
    assert seen == {("hub", "Bearer hf_secret_token"), ("cdn", None)}
    env = load(repo, "environment")
    assert [name for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if env[name].item()] == []
    assert env["HF_ENDPOINT"].item() and bytes(env["endpoint"].tolist()).decode() == hf_hub.endpoint


def test_a_tampered_cdn_blob_is_refused_and_nothing_is_kept(repo, tiny, hf_hub, hf_cache):
    hf_hub.tamper(hashlib.sha256(WEIGHTS).hexdigest(), WEIGHTS[:-4] + b"evil")
    with pytest.raises(RemoteError, match="is not the file its ETag names"):
        load(repo, "hf_file")
    assert list((hf_cache / "models--org--tiny" / "blobs").iterdir()) == []


@pytest.fixture
def locked(repo, tiny, hf_hub, tmp_path):
    lock = tmp_path / "safehub.lock"
    from safehub import cli

    assert cli.main(["lock", repo, "--load", "hf_snapshot", "--output", str(lock)]) == 0
    return lock


def test_lock_load_pins_hub_files_and_a_locked_load_uses_them(repo, tiny, hf_hub, locked):
    pins = json.loads(locked.read_text())["hub_files"]
    assert [(p["repo_id"], p["revision"], p["commit_sha"], p["filename"], p["size"]) for p in pins] == [
        ("org/tiny", "main", tiny, "config.json", 19), ("org/tiny", "main", tiny, "model.safetensors", len(WEIGHTS))]
    assert pins[1]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    # main moves on; the locked load still gets the pinned commit, with no API request
    hf_hub.commit("org/tiny", {"model.safetensors": save({k: v * 2 for k, v in STATE.items()})})
    hf_hub.clear_log()
    assert same(load(repo, "hf_snapshot", lock=str(locked)))
    assert not any("/api/" in r.path for r in hf_hub.requests())


def test_a_locked_load_refuses_changed_bytes_and_unpinned_files(repo, tiny, hf_hub, hf_cache, locked):
    with pytest.raises(RemoteError, match="the lock file pins no such Hub file"):
        load(repo, "hf_file", filename="config.json", revision=tiny, lock=str(locked))
    blob = hf_cache / "models--org--tiny" / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    blob.chmod(0o644)
    blob.write_bytes(WEIGHTS[:-4] + b"evil")  # changed in the cache
    with pytest.raises(RemoteError, match="is not the file the lock file pins for org/tiny@main/model.safetensors"):
        load(repo, "hf_snapshot", lock=str(locked))
