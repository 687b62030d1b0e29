"""The parent's pipeline against the GitHub emulator: resolve, validate, fetch, cache, errors."""

from __future__ import annotations

import json
import os

import pytest

import safehub
from safehub import _cache
from safehub.errors import (
    ArchiveError,
    AuthenticationError,
    ForkCommitError,
    IncompleteDownloadError,
    MissingDependenciesError,
    NetworkError,
    OfflineError,
    RateLimitError,
    RefNotFoundError,
    RepoNotFoundError,
)


def hubconf(value: str) -> str:
    return f"def which():\n    return {value!r}\n"


@pytest.fixture
def repo(make_repo):
    return make_repo("acme", "models", {"hubconf.py": hubconf("v1")})


def load(spec: str, **kw):
    return safehub.load(spec, "which", trust_repo=True, **kw)


def cache_records():
    state = os.path.join(safehub.get_dir(), ".safehub", "repos")
    return sorted(os.listdir(state)) if os.path.isdir(state) else []


def test_cache_hit_needs_no_network(repo, github):
    assert load("acme/models") == "v1"
    assert load("acme/models:main") == "v1"
    github.clear_log()
    assert load("acme/models") == "v1"
    assert load("acme/models:main") == "v1"
    assert github.requests() == []


def test_record_beside_the_tree(repo):
    load("acme/models")
    with open(os.path.join(safehub.get_dir(), ".safehub", "repos", "acme_models_main.json")) as f:
        record = json.load(f)
    assert record["commit_sha"] == repo.head_sha("main")
    assert record["ref"] == "main" and record["kind"] == "branch" and record["is_default_branch"]
    assert len(record["archive_sha256"]) == 64
    assert not os.path.exists(os.path.join(safehub.get_dir(), "main.zip"))


def test_force_reload_replaces_the_tree(repo, github):
    assert load("acme/models") == "v1"
    repo.commit("v2", {"hubconf.py": hubconf("v2")})
    assert load("acme/models") == "v1", "a cached branch is served as torch.hub does"
    assert load("acme/models", force_reload=True) == "v2"
    assert load("acme/models") == "v2"
    tmp = os.path.join(safehub.get_dir(), ".safehub", "tmp")
    assert os.listdir(tmp) == []


def test_tags_and_commits(repo):
    v1 = repo.head_sha("main")
    repo.tag("v1.0")
    repo.tag("v1.0-annotated", message="annotated")
    repo.commit("v2", {"hubconf.py": hubconf("v2")})
    repo.commit("v3", {"hubconf.py": hubconf("v3")})
    assert load("acme/models:v1.0") == "v1"
    assert load("acme/models:v1.0-annotated") == "v1"
    assert load(f"acme/models:{v1}") == "v1"           # full SHA of an old commit on main
    assert load(f"acme/models:{v1[:7]}") == "v1"       # short SHA
    assert load("acme/models:main") == "v3"


def test_slash_and_underscore_refs_share_a_folder_but_never_each_other(repo):
    repo.checkout("a/b", create=True)
    repo.commit("slash", {"hubconf.py": hubconf("slash")})
    repo.checkout("main")
    repo.checkout("a_b", create=True)
    repo.commit("underscore", {"hubconf.py": hubconf("underscore")})
    for _ in range(2):
        assert load("acme/models:a/b") == "slash"
        assert load("acme/models:a_b") == "underscore"


def test_pagination_past_100_branches(repo):
    repo.branches([f"bulk/{i:03d}" for i in range(150)])
    repo.checkout("zzz-last", create=True)
    repo.commit("last", {"hubconf.py": hubconf("last")})
    assert load("acme/models:zzz-last") == "last"


def test_unknown_ref(repo):
    with pytest.raises(RefNotFoundError, match="no branch or tag named 'nope'"):
        load("acme/models:nope")
    with pytest.raises(RefNotFoundError):
        load("acme/models:deadbeef")


def test_fork_commit_refused_unless_validation_skipped(repo, github):
    sha = github.add_fork_commit("acme", "models", {"hubconf.py": hubconf("fork")})
    with pytest.raises(ForkCommitError):
        load(f"acme/models:{sha}")
    assert cache_records() == []
    assert load(f"acme/models:{sha}", skip_validation=True) == "fork"


def test_skip_validation_uses_fewer_requests(repo, github):
    load("acme/models:main", skip_validation=True)
    api = [r.path for r in github.requests("api")]
    assert not any("/branches" in p or "/tags" in p for p in api)


def record_of(folder: str) -> dict:
    with open(os.path.join(safehub.get_dir(), ".safehub", "repos", f"{folder}.json")) as f:
        return json.load(f)


def assert_no_api_and_no_token(github) -> None:
    assert github.requests("api") == []
    assert github.requests(), "nothing was fetched at all"
    for request in github.requests():
        assert "authorization" not in request.headers, request.path


def test_skip_validation_asks_the_api_nothing_and_sends_no_token(repo, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "secret-token")
    github.clear_log()
    assert load("acme/models:main", skip_validation=True) == "v1"
    assert_no_api_and_no_token(github)
    assert [r.path for r in github.requests("web")] == ["/acme/models/zipball/main"]
    record = record_of("acme_models_main")
    # The commit comes from the archive's zip comment, as git archive and GitHub write it.
    assert record["commit_sha"] == repo.head_sha("main") and record["kind"] == "ref"

    # As torch.hub, the folder is reused until force_reload; force_reload still asks no API.
    repo.commit("v2", {"hubconf.py": hubconf("v2")})
    github.clear_log()
    assert load("acme/models:main", skip_validation=True) == "v1"
    assert github.requests() == []
    assert load("acme/models:main", skip_validation=True, force_reload=True) == "v2"
    assert_no_api_and_no_token(github)
    assert record_of("acme_models_main")["commit_sha"] == repo.head_sha("main")


def test_skip_validation_reuses_what_a_validated_load_cached(repo, github):
    assert load("acme/models:main") == "v1"
    github.clear_log()
    assert load("acme/models:main", skip_validation=True) == "v1"
    assert github.requests() == []


def test_skip_validation_guesses_the_default_branch_as_torch_hub(repo, make_repo, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "secret-token")
    legacy = make_repo("acme", "legacy", {"hubconf.py": hubconf("legacy")}, default_branch="master")
    github.clear_log()
    assert load("acme/models", skip_validation=True) == "v1"
    assert load("acme/legacy", skip_validation=True) == "legacy"
    assert_no_api_and_no_token(github)
    probes = [r.path for r in github.requests("web") if "/tree/" in r.path]
    assert probes == ["/acme/models/tree/main/", "/acme/legacy/tree/main/"]
    assert record_of("acme_models_main")["is_default_branch"]
    assert record_of("acme_legacy_master")["commit_sha"] == legacy.head_sha("master")
    github.clear_log()
    assert load("acme/legacy", skip_validation=True) == "legacy"
    assert github.requests() == [], "the default branch's folder is found with no network"


def test_skip_validation_prefers_the_branch_of_an_ambiguous_name(repo, github):
    repo.tag("main")  # a tag named like the branch, left at v1
    repo.commit("v2", {"hubconf.py": hubconf("v2")})
    with pytest.warns(UserWarning, match="both a branch and a tag"):
        assert load("acme/models:main", skip_validation=True) == "v2"
    assert_no_api_and_no_token(github)
    assert record_of("acme_models_main")["commit_sha"] == repo.head_sha("main")


def test_skip_validation_unknown_ref_caches_nothing(repo, github):
    with pytest.raises(RefNotFoundError, match="no archive of acme/models at nope"):
        load("acme/models:nope", skip_validation=True)
    assert github.requests("api") == []
    assert cache_records() == []


def test_skip_validation_archive_without_a_commit(repo, github, caplog):
    from safehub import _api
    from safehub.errors import LockFileError

    github.set_fault("no_comment")
    with caplog.at_level("WARNING", logger="safehub"):
        assert load("acme/models:main", skip_validation=True) == "v1"
    assert any("names no commit" in r.getMessage() for r in caplog.records)
    # Loaded as torch.hub would; the record says the commit is unknown, and a pin needs one.
    assert record_of("acme_models_main")["commit_sha"] == ""
    with pytest.raises(LockFileError, match="named no commit"):
        _api.pin("acme/models:main", skip_validation=True)
    github.clear_faults()
    key, pin = _api.pin("acme/models:main", force_reload=True)
    assert pin.commit_sha == repo.head_sha("main")


def test_rate_limit(repo, github):
    github.set_fault("rate_limit")
    with pytest.raises(RateLimitError, match="GITHUB_TOKEN") as info:
        load("acme/models")
    assert info.value.reset_at is not None and info.value.status == 403
    assert cache_records() == []


def test_bad_token(repo, github, monkeypatch):
    github.require_token = "good"
    monkeypatch.setenv("GITHUB_TOKEN", "bad")
    with pytest.raises(AuthenticationError, match="GITHUB_TOKEN"):
        load("acme/models")
    monkeypatch.setenv("GITHUB_TOKEN", "good")
    assert load("acme/models") == "v1"


def test_unknown_repo(github):
    with pytest.raises(RepoNotFoundError, match="no repository acme/ghost"):
        load("acme/ghost")


def test_network_down(monkeypatch):
    # The autouse fixture points GitHub at a closed loopback port.
    with pytest.raises(NetworkError, match="Could not reach"):
        load("acme/models")


def test_server_error_is_one_clear_error(repo, github):
    github.set_fault("server_error", server="api")
    with pytest.raises(safehub.SafeHubError, match="500"):
        load("acme/models")


def test_token_goes_to_the_api_host_only(repo, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "s3cret")
    load("acme/models")
    api = github.requests("api")
    assert api and all(r.headers.get("Authorization") == "Bearer s3cret" for r in api)
    others = [r for r in github.requests() if r.server != "api"]
    assert others and not any("s3cret" in json.dumps(dict(r.headers)) for r in others)


def test_token_dropped_on_cross_origin_redirect(repo, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "s3cret")
    github.set_fault("redirect_api")
    assert load("acme/models") == "v1"
    redirected = [r for r in github.requests("web") if "/repos/" in r.path]
    assert redirected, "the API answered through the other origin"
    assert all("Authorization" not in r.headers for r in redirected)


def test_cut_off_download_leaves_nothing(repo, github):
    github.set_fault("cut_off", times=1)
    with pytest.raises(IncompleteDownloadError):
        load("acme/models")
    assert cache_records() == []
    assert not os.path.exists(os.path.join(safehub.get_dir(), "acme_models_main"))
    assert load("acme/models") == "v1"


def test_corrupt_archive_leaves_nothing(repo, github):
    github.set_fault("corrupt", times=1)
    with pytest.raises(ArchiveError):
        load("acme/models")
    assert cache_records() == []
    assert load("acme/models") == "v1"


def test_tree_without_record_is_not_served(repo, github):
    load("acme/models")
    # A crash after the tree moved in but before its record was written looks like this.
    os.remove(os.path.join(safehub.get_dir(), ".safehub", "repos", "acme_models_main.json"))
    github.clear_log()
    assert load("acme/models") == "v1"
    assert github.requests("codeload"), "the unrecorded tree was downloaded again"


def test_torch_hub_folder_is_replaced_not_trusted(repo):
    planted = os.path.join(safehub.get_dir(), "acme_models_main")
    os.makedirs(planted)
    with open(os.path.join(planted, "hubconf.py"), "w") as f:
        f.write(hubconf("planted"))
    assert load("acme/models") == "v1"


def test_offline_mode(repo, github, monkeypatch):
    load("acme/models")
    monkeypatch.setenv("SAFEHUB_OFFLINE", "1")
    github.clear_log()
    assert load("acme/models") == "v1"
    with pytest.raises(OfflineError, match="SAFEHUB_OFFLINE"):
        load("acme/models:other")
    assert github.requests() == []


def test_missing_dependencies(make_repo):
    make_repo("acme", "deps", {"hubconf.py": "dependencies = ['torch', 'no_such_mod_x', 'no_such_y']\n"
                                              "def which():\n    return 1\n"})
    with pytest.raises(MissingDependenciesError) as info:
        load("acme/deps")
    assert info.value.missing == ["no_such_mod_x", "no_such_y"]
    assert isinstance(info.value, RuntimeError)



def test_lock_file_round_trip_and_tampering(repo, github, tmp_path):
    from safehub import _api, _pins
    from safehub.errors import HashMismatchError, LockFileError

    key, pin = _api.pin("acme/models")
    lock = tmp_path / "safehub.lock"
    lock.write_text(_pins.dumps({key: pin}))
    assert pin.commit_sha == repo.head_sha("main") and pin.ref == "main"

    # The branch moves on; a locked load still gets the pinned commit, asking the API nothing.
    repo.commit("v2", {"hubconf.py": hubconf("v2")})
    github.clear_log()
    assert load("acme/models", lock=lock, force_reload=True) == "v1"
    assert github.requests("api") == []

    # An archive that no longer matches its pin is refused; the old tree stays as it was.
    tampered = {key: _pins.Pin(pin.ref, pin.commit_sha, "0" * 64)}
    lock.write_text(_pins.dumps(tampered))
    with pytest.raises(HashMismatchError, match="lock file pins"):
        load("acme/models", lock=lock, force_reload=True)
    entry = _cache.lookup(safehub._refs.parse("acme/models"))
    assert entry is not None and entry.archive_sha256 == pin.archive_sha256

    with pytest.raises(LockFileError, match="no entry for acme/models:main"):
        load("acme/models:main", lock=lock)
    lock.write_text("{not json")
    with pytest.raises(LockFileError):
        load("acme/models", lock=lock)
