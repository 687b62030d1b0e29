"""Private repositories: archives through the API's archive endpoint, the token on the API host only.

The emulator answers 404 for a private repository to a request without a token that can read it,
as GitHub does, and redirects the API's ``/repos/{o}/{r}/zipball/{ref}`` to codeload with a
short-lived ``?token=`` of its own (another loopback origin).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import safehub
from safehub import _api
from safehub.errors import RefNotFoundError, RepoNotFoundError

TOKEN = "private-reader-token"


def hubconf(value: str) -> str:
    return f"def which():\n    return {value!r}\n"


@pytest.fixture
def private(make_repo):
    return make_repo("corp", "secret-models", {"hubconf.py": hubconf("private v1")}, private=True)


def load(spec: str, **kw):
    return safehub.load(spec, "which", trust_repo=True, **kw)


def assert_token_stayed_on_the_api(github, token: str) -> None:
    others = [r for r in github.requests() if r.server != "api"]
    assert others, "the archive came from somewhere"
    for request in others:
        assert token not in json.dumps(dict(request.headers)), (request.server, request.path)
        assert "authorization" not in request.headers, (request.server, request.path)


@pytest.mark.parametrize("variable", ["GITHUB_TOKEN", "SAFEHUB_GITHUB_TOKEN"])
def test_private_archive_comes_through_the_api_with_the_token(private, github, monkeypatch, variable):
    monkeypatch.setenv(variable, TOKEN)
    github.clear_log()
    assert load("corp/secret-models") == "private v1"
    zipballs = [r for r in github.requests("api") if "/zipball/" in r.path]
    assert [r.path for r in zipballs] == [f"/repos/corp/secret-models/zipball/{private.head_sha('main')}"]
    assert zipballs[0].headers.get("Authorization") == f"Bearer {TOKEN}"
    codeload = github.requests("codeload")
    assert len(codeload) == 1 and "?token=" in codeload[0].path and codeload[0].status == 200
    assert github.requests("web") == []
    assert_token_stayed_on_the_api(github, TOKEN)


def test_private_repository_without_a_token_names_the_token(private, github):
    with pytest.raises(RepoNotFoundError, match="or it is private.*GITHUB_TOKEN.*SAFEHUB_GITHUB_TOKEN"):
        load("corp/secret-models")


def test_a_token_that_cannot_read_it_is_named(private, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "someone-elses-token")
    with pytest.raises(RepoNotFoundError, match="token in GITHUB_TOKEN / SAFEHUB_GITHUB_TOKEN cannot read it"):
        load("corp/secret-models")


def test_locked_private_load_uses_the_api_archive_and_no_other_api_request(private, github, monkeypatch, tmp_path):
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    key, pin = _api.pin("corp/secret-models:main")
    lock = tmp_path / "safehub.lock"
    from safehub import _pins

    lock.write_text(_pins.dumps({key: pin}))
    safehub.set_dir(str(tmp_path / "other-hub"))
    github.clear_log()
    assert load("corp/secret-models:main", lock=lock) == "private v1"
    assert [r.path for r in github.requests("api")] == [f"/repos/corp/secret-models/zipball/{pin.commit_sha}"]
    assert_token_stayed_on_the_api(github, TOKEN)
    # Without the token, the pinned archive is not reachable: the 404 says why.
    safehub.set_dir(str(tmp_path / "third-hub"))
    monkeypatch.delenv("GITHUB_TOKEN")
    with pytest.raises(RefNotFoundError, match="private.*set GITHUB_TOKEN"):
        load("corp/secret-models:main", lock=lock)


def test_skip_validation_sends_no_token_and_says_so(private, github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    github.clear_log()
    with pytest.raises(RefNotFoundError, match="without skip_validation"):
        load("corp/secret-models:main", skip_validation=True)
    assert github.requests("api") == []
    assert all("authorization" not in r.headers for r in github.requests())


def test_codeload_refuses_without_its_own_token(private, github, monkeypatch):
    import urllib.error
    import urllib.request

    url = f"{github.codeload_url}/corp/secret-models/legacy.zip/main"
    for attempt in (url, url + "?token=forged"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(attempt, timeout=10)
        info.value.close()
        assert info.value.code == 404


def test_public_repositories_keep_the_web_host_without_a_token(make_repo, github):
    make_repo("acme", "public", {"hubconf.py": hubconf("public")})
    github.clear_log()
    assert load("acme/public") == "public"
    assert [r.path for r in github.requests("web")][0].startswith("/acme/public/zipball/")


def test_cli_private_load_offline_after_fetch(private, github, monkeypatch, tmp_path):
    env = {"GITHUB_TOKEN": TOKEN, "SAFEHUB_GITHUB_URL": github.url, "SAFEHUB_GITHUB_API_URL": github.api_url}
    import os

    proc = subprocess.run([sys.executable, "-m", "safehub", "list", "corp/secret-models"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "which" in proc.stdout
