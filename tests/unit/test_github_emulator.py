"""Tests of the loopback GitHub emulator itself, over real HTTP with urllib."""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
import zipfile

import pytest

from tests.git_repos import GitRepo
from tests.github_emulator import GitHubEmulator

# Fixtures github, github_emulator and make_repo come from tests.fixtures_github (conftest plugin).


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_PLAIN = urllib.request.build_opener()
_NO_FOLLOW = urllib.request.build_opener(_NoRedirect)


def fetch(url, headers=None, method="GET", follow=True):
    """(status, headers, body, final url); never raises for HTTP error statuses."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = _PLAIN if follow else _NO_FOLLOW
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read(), resp.url
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read(), err.url


def get_json(url, **kw):
    status, headers, body, _ = fetch(url, **kw)
    assert headers["Content-Type"].startswith("application/json"), (status, body)
    return status, headers, json.loads(body)


def parse_links(value):
    links = {}
    for part in value.split(","):
        url, rel = part.split(";")
        links[rel.strip().removeprefix('rel="').rstrip('"')] = url.strip()[1:-1]
    return links


@pytest.fixture
def repo(make_repo):
    """owner/proj: main, feature/deep/x (one commit ahead), an annotated and a lightweight tag."""
    r = make_repo("Owner", "Proj", files={"hubconf.py": "dependencies = []\n", "pkg/mod.py": "X = 1\n"})
    r.tag("v1.0", message="release 1.0")
    r.tag("light")
    r.checkout("feature/deep/x", create=True)
    r.commit("feature work", files={"pkg/feature.py": "F = 2\n"})
    r.checkout("main")
    return r


def api(github, path):
    return f"{github.api_url}{path}"


# -- basics ------------------------------------------------------------------------------------


def test_fixture_sets_env_and_distinct_origins(github):
    assert os.environ["SAFEHUB_GITHUB_URL"] == github.url
    assert os.environ["SAFEHUB_GITHUB_API_URL"] == github.api_url
    assert len({github.url, github.api_url, github.codeload_url}) == 3


def test_repo_endpoint_case_insensitive(github, repo):
    status, _, body = get_json(api(github, "/repos/owner/PROJ"))
    assert status == 200
    assert body["full_name"] == "Owner/Proj" and body["name"] == "Proj"
    assert body["owner"]["login"] == "Owner"
    assert body["default_branch"] == "main"
    assert body["private"] is False and body["fork"] is False
    assert body["html_url"] == f"{github.url}/Owner/Proj"
    status, _, body = get_json(api(github, "/repos/owner/missing"))
    assert status == 404 and body["message"] == "Not Found" and "documentation_url" in body


def test_github_fixture_unregisters_repos_after_test(github_emulator, tmp_path):
    saved = github_emulator.snapshot()
    github_emulator.add_repo("tmp", "repo", GitRepo(tmp_path / "r").path, default_branch="main")
    github_emulator.restore(saved)
    with pytest.raises(KeyError):
        github_emulator.repo("tmp", "repo")


def test_branches_sorted_with_slashes(github, repo):
    status, headers, body = get_json(api(github, "/repos/Owner/Proj/branches"))
    assert status == 200 and "Link" not in headers
    assert [b["name"] for b in body] == ["feature/deep/x", "main"]
    assert body[1]["commit"]["sha"] == repo.head_sha("main")
    assert body[0]["commit"]["sha"] == repo.head_sha("feature/deep/x")
    assert body[0]["protected"] is False
    status, _, one = get_json(api(github, "/repos/Owner/Proj/branches/feature/deep/x"))
    assert status == 200 and one["commit"]["sha"] == repo.head_sha("feature/deep/x")


def test_branch_pagination(github, repo):
    repo.branches([f"b{i:03d}" for i in range(150)])
    status, headers, page1 = get_json(api(github, "/repos/owner/proj/branches?per_page=100"))
    assert status == 200 and len(page1) == 100
    links = parse_links(headers["Link"])
    assert set(links) == {"next", "last"}
    repo_id = github.repo("owner", "proj").id
    assert links["next"] == f"{github.api_url}/repositories/{repo_id}/branches?per_page=100&page=2"
    status, headers, page2 = get_json(links["next"])
    assert len(page2) == 52  # 150 + main + feature/deep/x
    assert set(parse_links(headers["Link"])) == {"prev", "first"}
    names = [b["name"] for b in page1 + page2]
    assert names == sorted(names) and len(set(names)) == 152
    _, _, beyond = get_json(api(github, "/repos/owner/proj/branches?per_page=100&page=3"))
    assert beyond == []
    _, headers, default = get_json(api(github, "/repos/owner/proj/branches"))
    assert len(default) == 30 and parse_links(headers["Link"])["last"].endswith("per_page=30&page=6")
    _, _, capped = get_json(api(github, "/repos/owner/proj/branches?per_page=500"))
    assert len(capped) == 100


def test_tags_annotated_and_lightweight(github, repo):
    status, _, tags = get_json(api(github, "/repos/Owner/Proj/tags"))
    assert status == 200
    by_name = {t["name"]: t for t in tags}
    assert set(by_name) == {"v1.0", "light"}
    main = repo.head_sha("main")
    assert by_name["v1.0"]["commit"]["sha"] == main  # peeled, not the tag object
    assert by_name["light"]["commit"]["sha"] == main
    assert by_name["v1.0"]["zipball_url"].endswith("/repos/Owner/Proj/zipball/refs/tags/v1.0")
    assert {"tarball_url", "node_id"} <= set(by_name["light"])


def test_tags_pagination(github, repo):
    for i in range(5):
        repo.tag(f"t{i}")
    _, headers, page = get_json(api(github, "/repos/Owner/Proj/tags?per_page=3&page=2"))
    assert len(page) == 3
    assert set(parse_links(headers["Link"])) == {"prev", "next", "last", "first"}


def test_commits_resolution(github, repo):
    main, feature = repo.head_sha("main"), repo.head_sha("feature/deep/x")
    base = api(github, "/repos/Owner/Proj/commits/")
    for ref, want in [("main", main), ("feature/deep/x", feature), ("v1.0", main), ("light", main),
                      (feature, feature), (feature[:7], feature), (feature[:4], feature),
                      (feature.upper(), feature), ("refs/tags/v1.0", main),
                      ("refs/heads/feature/deep/x", feature)]:
        status, _, body = get_json(base + ref)
        assert status == 200 and body["sha"] == want, ref
    _, _, body = get_json(base + "feature/deep/x")
    assert body["commit"]["message"] == "feature work"
    assert body["commit"]["tree"]["sha"] == repo.git("rev-parse", f"{feature}^{{tree}}")
    assert body["parents"][0]["sha"] == main
    status, _, body = get_json(base + "deadbeef")
    assert status == 422 and body["message"] == "No commit found for SHA: deadbeef"
    status, _, _ = get_json(base + "no-such-branch")
    assert status == 404
    status, _, _ = get_json(base + "main~1")  # no rev-parse syntax
    assert status == 404


def test_commits_branch_wins_over_tag(github, repo):
    repo.tag("feature/deep/x", at="main")
    _, _, body = get_json(api(github, "/repos/Owner/Proj/commits/feature/deep/x"))
    assert body["sha"] == repo.head_sha("feature/deep/x")


def test_compare(github, repo):
    main, feature = repo.head_sha("main"), repo.head_sha("feature/deep/x")
    url = api(github, "/repos/Owner/Proj/compare/")
    _, _, body = get_json(url + "main...feature/deep/x")
    assert (body["status"], body["ahead_by"], body["behind_by"]) == ("ahead", 1, 0)
    assert body["merge_base_commit"]["sha"] == main
    _, _, body = get_json(url + "feature/deep/x...main")
    assert (body["status"], body["ahead_by"], body["behind_by"]) == ("behind", 0, 1)
    _, _, body = get_json(url + "main...v1.0")
    assert body["status"] == "identical"
    repo.commit("main moves on")
    _, _, body = get_json(url + f"main...{feature[:8]}")
    assert (body["status"], body["ahead_by"], body["behind_by"]) == ("diverged", 1, 1)
    status, _, _ = get_json(url + "main...nope")
    assert status == 404


# -- archives ----------------------------------------------------------------------------------


def test_zipball_redirect_and_zip(github, repo):
    repo.symlink("link.py", "pkg/mod.py")
    sha = repo.commit("add link")
    status, headers, _, _ = fetch(f"{github.url}/owner/proj/zipball/main", follow=False)
    assert status == 302
    assert headers["Location"] == f"{github.codeload_url}/Owner/Proj/legacy.zip/main"
    status, headers, body, final = fetch(f"{github.url}/owner/proj/zipball/main")
    assert status == 200 and final.startswith(github.codeload_url)
    assert headers["Content-Type"] == "application/zip"
    assert int(headers["Content-Length"]) == len(body)
    top = f"Owner-Proj-{sha[:7]}/"
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        names = zf.namelist()
        assert all(n.startswith(top) for n in names)
        assert zf.read(top + "hubconf.py") == b"dependencies = []\n"
        assert zf.read(top + "pkg/mod.py") == b"X = 1\n"
        info = zf.getinfo(top + "link.py")
        assert (info.external_attr >> 16) & 0o170000 == 0o120000  # a symlink entry
        assert zf.read(info) == b"pkg/mod.py"
        assert top + "pkg/feature.py" not in names


@pytest.mark.parametrize("ref", ["feature/deep/x", "v1.0", "refs/tags/v1.0", "refs/heads/main"])
def test_zipball_refs(github, repo, ref):
    sha = repo.rev_parse(ref)
    status, _, body, final = fetch(f"{github.url}/Owner/Proj/zipball/{ref}")
    assert status == 200 and final.endswith(f"/legacy.zip/{ref}")
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist()[0].split("/")[0] == f"Owner-Proj-{sha[:7]}"


def test_zipball_comment_is_the_commit_sha(github, repo):
    # git archive writes the commit into the zip comment; GitHub's zipballs carry it the same way.
    for ref in ("main", "v1.0", "feature/deep/x"):
        body = fetch(f"{github.url}/Owner/Proj/zipball/{ref}")[2]
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            assert zf.comment == repo.rev_parse(ref).encode()


def test_no_comment_fault(github, repo):
    url = f"{github.url}/Owner/Proj/zipball/main"
    good = fetch(url)[2]
    github.set_fault("no_comment", times=1)
    status, headers, bad, _ = fetch(url)
    assert status == 200 and int(headers["Content-Length"]) == len(bad) == len(good) - 40
    with zipfile.ZipFile(io.BytesIO(bad)) as zf:
        assert zf.comment == b""
        assert zf.read("Owner-Proj-" + repo.rev_parse("main")[:7] + "/hubconf.py") == b"dependencies = []\n"
    assert fetch(url)[2] == good


def test_tree_pages(github, repo):
    for ref in ("main/", "feature/deep/x", "v1.0"):
        status, headers, _, _ = fetch(f"{github.url}/Owner/Proj/tree/{ref}")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert fetch(f"{github.url}/Owner/Proj/tree/master/")[0] == 404
    assert fetch(f"{github.url}/Owner/Nope/tree/main/")[0] == 404


def test_zipball_ambiguous_and_unknown(github, repo):
    repo.tag("main")
    status, _, _, _ = fetch(f"{github.url}/Owner/Proj/zipball/main", follow=False)
    assert status == 300
    for ref in ("refs/heads/main", "refs/tags/main"):
        assert fetch(f"{github.url}/Owner/Proj/zipball/{ref}", follow=False)[0] == 302
    assert fetch(f"{github.url}/Owner/Proj/zipball/nope", follow=False)[0] == 404
    assert fetch(f"{github.url}/Owner/Nope/zipball/main", follow=False)[0] == 404
    assert fetch(f"{github.codeload_url}/Owner/Proj/legacy.zip/nope")[0] == 404


def test_fork_commit(github, repo):
    sha = github.add_fork_commit("owner", "proj", {"hubconf.py": "evil = True\n", "pkg/mod.py": None})
    _, _, body = get_json(api(github, f"/repos/Owner/Proj/commits/{sha[:10]}"))
    assert body["sha"] == sha and body["parents"][0]["sha"] == repo.head_sha("main")
    _, _, branches = get_json(api(github, "/repos/Owner/Proj/branches"))
    _, _, tags = get_json(api(github, "/repos/Owner/Proj/tags"))
    assert sha not in {b["commit"]["sha"] for b in branches + tags}
    for b in branches:
        _, _, cmp = get_json(api(github, f"/repos/Owner/Proj/compare/{b['name']}...{sha}"))
        assert cmp["status"] in ("ahead", "diverged") and cmp["ahead_by"] == 1
    status, _, zbody, _ = fetch(f"{github.url}/Owner/Proj/zipball/{sha}")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(zbody)) as zf:
        top = f"Owner-Proj-{sha[:7]}/"
        assert zf.read(top + "hubconf.py") == b"evil = True\n"
        assert top + "pkg/mod.py" not in zf.namelist()
    assert repo.git("status", "--porcelain") == ""  # the working tree was not touched


def test_files_and_head(github):
    url = github.add_file("weights.bin", b"\x00\x01" * 1000)
    status, headers, body, _ = fetch(url)
    assert status == 200 and body == b"\x00\x01" * 1000 and headers["Content-Length"] == "2000"
    status, headers, body, _ = fetch(url, method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "2000"
    assert fetch(f"{github.url}/files/missing.bin")[0] == 404


# -- faults ------------------------------------------------------------------------------------


def test_rate_limit_fault(github, repo):
    fault = github.set_fault("rate_limit", times=1)
    status, headers, body = get_json(api(github, "/repos/Owner/Proj"))
    assert status == 403
    assert headers["X-RateLimit-Limit"] == "60" and headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["X-RateLimit-Reset"]) > time.time() + 3000
    assert body["message"].startswith("API rate limit exceeded for 127.0.0.1.")
    assert "documentation_url" in body
    assert get_json(api(github, "/repos/Owner/Proj"))[0] == 200
    assert fault.hits == 1
    # only the API is rate limited
    github.set_fault("rate_limit")
    assert fetch(f"{github.url}/Owner/Proj/zipball/main")[0] == 200


def test_unauthorized_and_require_token(github, repo):
    github.set_fault("unauthorized")
    status, _, body = get_json(api(github, "/repos/Owner/Proj"))
    assert status == 401 and body["message"] == "Bad credentials"
    github.clear_faults()
    github.require_token = "secret"
    url = api(github, "/repos/Owner/Proj")
    assert get_json(url)[0] == 401
    assert get_json(url, headers={"Authorization": "token wrong"})[2]["message"] == "Bad credentials"
    assert get_json(url, headers={"Authorization": "token secret"})[0] == 200
    assert get_json(url, headers={"Authorization": "Bearer secret"})[0] == 200


@pytest.mark.parametrize("server", ["api", "web", "codeload", "files"])
def test_server_error_fault(github, repo, server):
    github.add_file("f.bin", b"data")
    urls = {"api": api(github, "/repos/Owner/Proj"),
            "web": f"{github.url}/Owner/Proj/zipball/main",
            "codeload": f"{github.codeload_url}/Owner/Proj/legacy.zip/main",
            "files": f"{github.url}/files/f.bin"}
    github.set_fault("server_error", server=server, times=2)
    for name, url in urls.items():
        status = fetch(url, follow=False)[0]
        assert status == (500 if name == server else 200 if name != "web" else 302), name
    assert fetch(urls[server], follow=False)[0] == 500
    assert fetch(urls[server], follow=False)[0] in (200, 302)  # times=2 used up


def test_slow_fault(github):
    url = github.add_file("slow.bin", b"x" * 8192)
    github.set_fault("slow", delay=0.05, chunk=1024)
    start = time.monotonic()
    assert fetch(url)[2] == b"x" * 8192
    assert time.monotonic() - start >= 0.35
    with urllib.request.urlopen(url, timeout=0.02) as resp, pytest.raises(TimeoutError):
        resp.read()


def test_cut_off_fault(github, repo):
    url = github.add_file("big.bin", os.urandom(300_000))
    github.set_fault("cut_off", after=1000, times=1)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Length"] == "300000"
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    assert len(info.value.partial) == 1000
    assert len(fetch(url)[2]) == 300_000
    github.set_fault("cut_off")  # default: half, on codeload too
    with urllib.request.urlopen(f"{github.url}/Owner/Proj/zipball/main", timeout=10) as resp:
        with pytest.raises(http.client.IncompleteRead):
            resp.read()


def test_corrupt_fault(github, repo):
    for i in range(20):
        repo.write({f"data/{i}.txt": f"line {i}\n" * 2000})
    repo.commit("data")
    url = f"{github.url}/Owner/Proj/zipball/main"
    good = fetch(url)[2]
    github.set_fault("corrupt", times=1)
    bad = fetch(url)[2]
    assert len(bad) == len(good) and bad != good
    with pytest.raises((zipfile.BadZipFile, zlib_error())):
        with zipfile.ZipFile(io.BytesIO(bad)) as zf:
            for name in zf.namelist():
                zf.read(name)
    assert fetch(url)[2] == good


def zlib_error():
    import zlib
    return zlib.error


def test_redirect_api_fault(github, repo):
    github.set_fault("redirect_api", times=1)
    path = "/repos/Owner/Proj/branches?per_page=1"
    status, headers, _, _ = fetch(api(github, path), follow=False)
    assert status == 302 and headers["Location"] == f"{github.url}{path}"
    github.set_fault("redirect_api", times=1)
    github.clear_log()
    status, _, body, final = fetch(api(github, path), headers={"Authorization": "token t"})
    assert status == 200 and final == f"{github.url}{path}"
    assert json.loads(body)[0]["name"] == "feature/deep/x"
    assert [(r.server, r.path, r.status) for r in github.requests()] == [
        ("api", path, 302), ("web", path, 200)]


def test_clear_faults_and_path_prefix(github, repo):
    github.set_fault("server_error", path_prefix="/repos/Owner/Proj/tags")
    assert get_json(api(github, "/repos/Owner/Proj/tags"))[0] == 500
    assert get_json(api(github, "/repos/Owner/Proj/branches"))[0] == 200
    github.clear_faults()
    assert get_json(api(github, "/repos/Owner/Proj/tags"))[0] == 200
    with pytest.raises(ValueError):
        github.set_fault("nonsense")


# -- log and concurrency -----------------------------------------------------------------------


def test_request_log(github, repo):
    github.clear_log()
    fetch(api(github, "/repos/Owner/Proj/branches?per_page=5"), headers={"Authorization": "token abc"})
    fetch(f"{github.url}/Owner/Proj/zipball/main")
    logged = github.requests()
    assert [(r.server, r.method, r.status) for r in logged] == [
        ("api", "GET", 200), ("web", "GET", 302), ("codeload", "GET", 200)]
    first = logged[0]
    assert first.path == "/repos/Owner/Proj/branches?per_page=5"
    assert first.headers["Authorization"] == "token abc" and first.headers.get("authorization") == "token abc"
    assert "Authorization" not in logged[1].headers
    assert first.time <= logged[2].time
    assert github.requests(server="codeload")[0].path == "/Owner/Proj/legacy.zip/main"
    assert len(github.requests(path_prefix="/repos/")) == 1
    github.add_file("x", b"1")
    fetch(f"{github.url}/files/x")
    assert [r.target for r in github.requests(server="files")] == ["files"]
    github.clear_log()
    assert github.requests() == []


def test_concurrent_downloads(github, repo):
    url = f"{github.url}/Owner/Proj/zipball/main"
    results: list[bytes] = []

    def worker():
        results.append(fetch(url)[2])

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len(set(results)) == 1
    assert github.errors == []


def test_standalone_context_manager(tmp_path):
    r = GitRepo(tmp_path / "r")
    r.commit("init", files={"a.txt": "a"})
    with GitHubEmulator() as emu:
        emu.add_repo("a", "b", r.path)
        assert emu.repo("A", "B").default_branch == "main"
        url = f"{emu.api_url}/repos/a/b"
        assert fetch(url)[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
