"""Attacks on the fetch broker: a hostile worker asks the parent for what it should not have.

The broker is the sandbox's way out, so every rule of SECURITY.md's broker section is attacked
here by a hubconf that talks to the channel directly, as hostile code can, on the cold and the
warm path with every layer on. Each test checks that the attack ran (the worker's own account
of every attempt comes back) and that its canary is untouched: the files around the cache, the
trusted_list, the cache's own checkpoint.
"""

from __future__ import annotations

import pytest

import safehub
from safehub._egress import limits as _limits
from tests.local_repos import write_repo

pytestmark = pytest.mark.usefixtures("worker_start")
SANDBOX = safehub.Sandbox(timeout=120)

HOSTILE = '''
    import os
    import sys

    dependencies = []


    def _ask(what, args):
        channel = sys.modules["_safehub_worker.work"].channel()
        try:
            return "answered", channel.ask(what, args)[0]
        except Exception as exc:
            return "refused", f"{type(exc).__name__}: {exc}"


    def ask_each(what, many):
        return [_ask(what, args) for args in many]


    def flood(what, args, times):
        outcomes = [_ask(what, args)[0] for _ in range(times)]
        return {"answered": outcomes.count("answered"), "refused": outcomes.count("refused")}


    def tamper(url):
        _, value = _ask("fetch", {"url": url, "name": "weights.bin"})
        path = value["path"]
        attempts = {}
        for name, attempt in {
            "write": lambda: open(path, "r+b").write(b"tampered"),
            "truncate": lambda: os.truncate(path, 0),
            "unlink": lambda: os.unlink(path),
            "rename": lambda: os.rename(path, path + ".x"),
            "create": lambda: open(os.path.join(os.path.dirname(path), "planted.pth"), "wb").write(b"x"),
            "chmod": lambda: os.chmod(path, 0o666),
        }.items():
            try:
                attempt()
                attempts[name] = "done"
            except OSError as exc:
                attempts[name] = f"denied: {exc.errno}"
        return {"path": path, "attempts": attempts, "read": open(path, "rb").read()}


    def peek(paths):
        seen = {}
        for path in paths:
            try:
                seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path, "rb").read()[:64].decode("latin-1")
            except OSError as exc:
                seen[path] = f"denied: {exc.errno}"
        return seen
'''


@pytest.fixture
def hostile(tmp_path):
    return str(write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE}))


def run(repo, entry, **kwargs):
    return safehub.load(repo, entry, source="local", isolate=SANDBOX, trust_repo=True, **kwargs)


def test_names_that_are_paths_links_or_lock_files_are_refused(hostile, github, hub_dir):
    url = github.add_file("weights.bin", b"the real file")
    (hub_dir).mkdir(parents=True, exist_ok=True)
    canary = hub_dir / "trusted_list"
    canary.write_text("the caller's trust\n")
    names = ["../trusted_list", "../../escape.pth", "/etc/passwd", "a/b.pth", ".hidden", "..", ".", "",
             "x.lock", "x.partial", "nul\x00byte", "new\nline", "x" * 300, "back\\slash", "tab\tname"]
    outcomes = run(hostile, "ask_each", what="fetch", many=[{"url": url, "name": n} for n in names])
    assert [o[0] for o in outcomes] == ["refused"] * len(names), outcomes
    assert canary.read_text() == "the caller's trust\n"
    assert not (hub_dir.parent / "escape.pth").exists()
    assert [r for r in github.requests() if r.path.startswith("/files/")] == []  # refused before any download
    checkpoints = hub_dir / "checkpoints"
    assert not checkpoints.exists() or [p.name for p in checkpoints.iterdir()] == []


def test_places_outside_the_checkpoints_folders_are_refused(hostile, github, hub_dir):
    url = github.add_file("weights.bin", b"the real file")
    places = ["..", "repos", "hub", "/tmp", "hub/checkpoints/../..", 7]
    outcomes = run(hostile, "ask_each", what="fetch", many=[{"url": url, "name": "ok.pth", "place": p} for p in places])
    assert [o[0] for o in outcomes] == ["refused"] * len(places), outcomes


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/", "javascript:alert(1)",
                                 "http://" + "a" * 9000, "", 12])
def test_urls_that_are_not_http_are_refused(hostile, url):
    (outcome,) = run(hostile, "ask_each", what="get", many=[{"url": url}])
    assert outcome[0] == "refused", outcome


def test_a_flood_of_fetches_is_cut_at_the_cap(hostile, github, monkeypatch):
    monkeypatch.setattr(_limits, "DEFAULT_LIMITS", _limits.Limits(max_fetches=10))
    url = github.add_file("small.txt", b"small")
    counts = run(hostile, "flood", what="get", args={"url": url}, times=200)
    assert counts == {"answered": 10, "refused": 190}
    assert len([r for r in github.requests() if r.path.startswith("/files/")]) == 10


def test_a_get_larger_than_its_cap_is_refused(hostile, github, monkeypatch):
    monkeypatch.setattr(_limits, "DEFAULT_LIMITS", _limits.Limits(max_get_bytes=1024))
    url = github.add_file("large.bin", b"x" * 4096)
    (outcome,) = run(hostile, "ask_each", what="get", many=[{"url": url}])
    assert outcome[0] == "refused" and "1024" in outcome[1], outcome


def test_the_worker_cannot_change_what_it_was_served(hostile, github, hub_dir):
    url = github.add_file("weights.bin", b"the real file")
    seen = run(hostile, "tamper", url=url)
    assert seen["read"] == b"the real file"  # the attack ran: it read its view
    assert all(v.startswith("denied") for v in seen["attempts"].values()), seen["attempts"]
    assert (hub_dir / "checkpoints" / "weights.bin").read_bytes() == b"the real file"


def test_the_worker_sees_nothing_else_of_the_cache(hostile, github, hub_dir, tmp_path):
    hub_dir.mkdir(parents=True, exist_ok=True)
    (hub_dir / "trusted_list").write_text("someone_secret\n")
    (hub_dir / "checkpoints").mkdir()
    (hub_dir / "checkpoints" / "someone-elses.pth").write_bytes(b"another model")
    (hub_dir / "owner_other_main").mkdir()
    (hub_dir / "owner_other_main" / "hubconf.py").write_text("SECRET = 1\n")
    paths = [str(hub_dir), str(hub_dir / "trusted_list"), str(hub_dir / "checkpoints"),
             str(hub_dir / "checkpoints" / "someone-elses.pth"), str(hub_dir / "owner_other_main" / "hubconf.py")]
    seen = run(hostile, "peek", paths=paths)
    assert set(seen) == set(paths)  # the attack ran
    assert all(isinstance(v, str) and v.startswith("denied") for v in seen.values()), seen


def test_nested_repository_names_are_checked(hostile, github):
    names = ["../../etc", "/etc/passwd", "owner/repo:../../x", "https://evil.example/x", "a" * 600, 5]
    outcomes = run(hostile, "ask_each", what="repo", many=[{"github": n} for n in names])
    assert [o[0] for o in outcomes] == ["refused"] * len(names), outcomes
    assert [r for r in github.requests()] == []
