"""A loopback GitHub for the test suite: real HTTP on 127.0.0.1, real git repositories behind it.

Three servers, three origins, one shared state (like github.com, api.github.com and
codeload.github.com)::

    with GitHubEmulator() as emu:
        emu.add_repo("pytorch", "vision", "/path/to/git/worktree")
        emu.url, emu.api_url, emu.codeload_url

API answers mirror GitHub's REST shapes (repos, branches, tags, commits, compare; paginated with
``Link`` headers pointing at ``/repositories/{id}/...`` like GitHub). The web origin redirects
``/{o}/{r}/zipball/{ref}`` to codeload, which serves ``git archive`` zips whose top folder is
``{owner}-{repo}-{sha7}/`` and whose zip comment is the full commit SHA (git archive writes it, and
so does GitHub); it also answers ``/{o}/{r}/tree/{ref}`` (200 or 404), which torch.hub probes.
A repository added with ``private=True`` answers 404 everywhere (as GitHub does) unless the API
request carries a token of ``private_tokens``; then the API's ``/repos/{o}/{r}/zipball/{ref}``
redirects to codeload with a short-lived ``?token=`` of its own, which codeload requires.
Faults (rate limits, 401, 500, slow or cut-off bodies, corrupt zips, zips without their comment,
cross-origin API redirects) are switched on with ``set_fault``. Every request is logged.

Standard library only; every server runs in daemon threads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

DOCS = "https://docs.github.com/rest"
CHUNK = 64 * 1024
MAX_SLOW_DELAY = 5.0
SERVERS = ("api", "web", "codeload")
TARGETS = ("api", "web", "codeload", "files")  # "files" = /files/* on the web origin
GATE_FAULTS = ("rate_limit", "unauthorized", "server_error", "redirect_api")
BODY_FAULTS = ("slow", "cut_off", "corrupt", "no_comment")
# Where each fault applies unless set_fault(..., server=...) says otherwise (None = everywhere).
DEFAULT_FAULT_TARGETS: dict[str, tuple[str, ...] | None] = {
    "rate_limit": ("api",),
    "unauthorized": ("api",),
    "redirect_api": ("api",),
    "server_error": None,
    "slow": ("codeload", "files"),
    "cut_off": ("codeload", "files"),
    "corrupt": ("codeload", "files"),
    "no_comment": ("codeload",),
}
_HEX_REF = re.compile(r"[0-9a-fA-F]{4,40}")
# Characters git forbids in ref names (and rev-parse syntax we must not let through).
_BAD_REF = re.compile(r"\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]|^-|^/|/$|//|\.lock$|^@$")
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Fork Author", "GIT_AUTHOR_EMAIL": "fork@example.invalid",
    "GIT_COMMITTER_NAME": "Fork Author", "GIT_COMMITTER_EMAIL": "fork@example.invalid",
    "GIT_AUTHOR_DATE": "@1640995200 +0000", "GIT_COMMITTER_DATE": "@1640995200 +0000",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C",
}


class HeaderDict(dict):
    """A dict of request headers with case-insensitive lookups (keys stored lower-case)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    server: str  # "api" | "web" | "codeload": the origin that received it
    target: str  # as server, or "files" for /files/* on the web origin
    method: str
    path: str  # path with query, as sent
    headers: HeaderDict
    time: float
    status: int | None = None  # filled in once answered


@dataclass
class Fault:
    kind: str
    targets: tuple[str, ...] | None  # None: every server
    remaining: int | None  # None: until cleared
    path_prefix: str | None
    opts: dict[str, Any]
    hits: int = 0

    def matches(self, target: str, path: str) -> bool:
        return (
            (self.remaining is None or self.remaining > 0)
            and (self.targets is None or target in self.targets)
            and (self.path_prefix is None or path.startswith(self.path_prefix))
        )


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    git_dir: str
    default_branch: str
    private: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, obj: Any, **headers: str) -> "Response":
        body = json.dumps(obj).encode()
        return cls(status, body, {"Content-Type": "application/json; charset=utf-8", **headers})

    @classmethod
    def text(cls, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> "Response":
        return cls(status, text.encode(), {"Content-Type": content_type})

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> "Response":
        return cls(status, b"", {"Location": location})


def _not_found() -> Response:
    return Response.json(404, {"message": "Not Found", "documentation_url": DOCS})


class GitHubEmulator:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.require_token: str | None = None
        # Tokens that may read private repositories (sent as "Bearer T" or "token T" to the API).
        self.private_tokens: set[str] = {"private-reader-token"}
        self._archive_tokens: dict[str, tuple[str, float]] = {}  # codeload token -> (repo, expiry)
        self.errors: list[str] = []  # internal emulator errors (tracebacks), for debugging
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._files: dict[str, bytes] = {}
        self._faults: list[Fault] = []
        self._log: list[RecordedRequest] = []
        self._zip_cache: dict[tuple[str, str, str], bytes] = {}
        self._next_id = 1000
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "GitHubEmulator":
        if self._servers:
            return self
        for name in SERVERS:
            server = _Server((self.host, 0), _Handler)
            server.emulator, server.name = self, name
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                      name=f"github-emulator-{name}", daemon=True)
            thread.start()
            self._servers[name] = server
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "GitHubEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _origin(self, name: str) -> str:
        host, port = self._servers[name].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The web origin (like https://github.com)."""
        return self._origin("web")

    @property
    def api_url(self) -> str:
        """The API origin (like https://api.github.com)."""
        return self._origin("api")

    @property
    def codeload_url(self) -> str:
        """The archive origin (like https://codeload.github.com)."""
        return self._origin("codeload")

    # -- state ---------------------------------------------------------------------------------

    def add_repo(self, owner: str, name: str, git_dir: str | os.PathLike,
                 default_branch: str | None = None, *, private: bool = False) -> Repo:
        """Serve the git repository at ``git_dir`` as ``owner/name`` (replacing any earlier one);
        ``private``: visible only to API requests carrying a token of ``private_tokens``."""
        git_dir = os.fspath(git_dir)
        if default_branch is None:
            default_branch = _git(git_dir, "symbolic-ref", "--short", "HEAD").decode().strip()
        with self._lock:
            old = self._repos.get((owner.lower(), name.lower()))
            if old is None:
                self._next_id += 1
            repo = Repo(old.id if old else self._next_id, owner, name, git_dir, default_branch, private)
            self._repos[(owner.lower(), name.lower())] = repo
        return repo

    def remove_repo(self, owner: str, name: str) -> None:
        with self._lock:
            self._repos.pop((owner.lower(), name.lower()), None)

    def set_default_branch(self, owner: str, name: str, branch: str) -> None:
        self.repo(owner, name).default_branch = branch

    def repo(self, owner: str, name: str) -> Repo:
        with self._lock:
            return self._repos[(owner.lower(), name.lower())]

    def _repo_by_id(self, repo_id: str) -> Repo | None:
        with self._lock:
            return next((r for r in self._repos.values() if str(r.id) == repo_id), None)

    def add_file(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``{url}/files/{name}``; returns that URL."""
        with self._lock:
            self._files[name] = bytes(data)
        return f"{self.url}/files/{quote(name)}"

    def add_fork_commit(self, owner: str, name: str, files: Mapping[str, str | bytes | None],
                        message: str = "Commit from a fork", parent: str | None = None) -> str:
        """Create a commit on top of ``parent`` (default: the default branch head) that no branch
        or tag references, like a commit pushed to a fork: reachable by sha only. Returns its sha.
        ``files`` maps paths to new contents (None deletes)."""
        repo = self.repo(owner, name)
        parent_sha = self._resolve(repo, parent or repo.default_branch)
        if parent_sha is None:
            raise ValueError(f"unknown parent {parent!r}")
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            g = lambda *a, data=None: _git(repo.git_dir, *a, input=data, env=env).decode().strip()  # noqa: E731
            g("read-tree", parent_sha)
            for path, content in files.items():
                if content is None:
                    g("update-index", "--force-remove", "--", path)
                    continue
                blob = g("hash-object", "-w", "--stdin",
                         data=content.encode() if isinstance(content, str) else content)
                g("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
            tree = g("write-tree")
            return g("commit-tree", tree, "-p", parent_sha, "-m", message)

    def snapshot(self) -> tuple[dict, dict]:
        """Registered repositories and files, for ``restore`` (used to isolate tests)."""
        with self._lock:
            return dict(self._repos), dict(self._files)

    def restore(self, snap: tuple[dict, dict]) -> None:
        with self._lock:
            self._repos, self._files = dict(snap[0]), dict(snap[1])

    def reset(self) -> None:
        """Clear faults, the request log, require_token and recorded errors (repos stay)."""
        with self._lock:
            self._faults.clear()
            self._log.clear()
            self.errors.clear()
            self.require_token = None

    # -- faults --------------------------------------------------------------------------------

    def set_fault(self, kind: str, *, times: int | None = None, server: str | Iterable[str] | None = "",
                  path_prefix: str | None = None, **opts: Any) -> Fault:
        """Switch a fault on (replacing any earlier fault of the same kind); returns it, so tests
        can read ``fault.hits``. ``times``: how many requests it applies to (None: until cleared).
        ``server``: "api" | "web" | "codeload" | "files" | a list of those | None for all
        (default: see DEFAULT_FAULT_TARGETS). ``path_prefix``: only requests whose path starts so.
        Options: rate_limit(status=403, retry_after=None), server_error(status=500),
        slow(delay=0.05, chunk=CHUNK), cut_off(after=len//2), corrupt(offset=len//2, length=16),
        no_comment() (the zip without its comment, so without its commit SHA, as an archive
        repacked by a mirror would come).
        """
        if kind not in DEFAULT_FAULT_TARGETS:
            raise ValueError(f"unknown fault {kind!r}")
        if server == "":
            targets = DEFAULT_FAULT_TARGETS[kind]
        elif server is None or server == "all":
            targets = None
        else:
            targets = (server,) if isinstance(server, str) else tuple(server)
            unknown = set(targets) - set(TARGETS)
            if unknown:
                raise ValueError(f"unknown server(s) {sorted(unknown)}")
        fault = Fault(kind, targets, times, path_prefix, opts)
        with self._lock:
            self._faults = [f for f in self._faults if f.kind != kind] + [fault]
        return fault

    def clear_faults(self, kind: str | None = None) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if kind is not None and f.kind != kind]

    def _take_fault(self, kinds: Iterable[str], target: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.matches(target, path):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    # -- request log ---------------------------------------------------------------------------

    def requests(self, server: str | None = None, path_prefix: str | None = None) -> list[RecordedRequest]:
        """Logged requests, oldest first; ``server`` matches the origin name or the target."""
        with self._lock:
            return [r for r in self._log
                    if (server is None or server in (r.server, r.target))
                    and (path_prefix is None or r.path.startswith(path_prefix))]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- git -----------------------------------------------------------------------------------

    def _rev(self, repo: Repo, spec: str) -> str | None:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
                              cwd=repo.git_dir, capture_output=True, env=_env())
        return proc.stdout.decode().strip() if proc.returncode == 0 else None

    def _resolve(self, repo: Repo, ref: str) -> str | None:
        """Branch first, then tag, then (short) sha; explicit refs/heads/ and refs/tags/ too."""
        if not ref or _BAD_REF.search(ref):
            return None
        if ref.startswith(("refs/heads/", "refs/tags/")):
            return self._rev(repo, ref)
        sha = self._rev(repo, f"refs/heads/{ref}") or self._rev(repo, f"refs/tags/{ref}")
        if sha is None and _HEX_REF.fullmatch(ref):
            sha = self._rev(repo, ref.lower())
        return sha

    def _is_ambiguous(self, repo: Repo, ref: str) -> bool:
        return (not ref.startswith("refs/") and not _BAD_REF.search(ref)
                and self._rev(repo, f"refs/heads/{ref}") is not None
                and self._rev(repo, f"refs/tags/{ref}") is not None)

    def _refs(self, repo: Repo, namespace: str) -> list[tuple[str, str, str]]:
        """(name, object sha, peeled commit sha) for every ref under refs/{namespace}/."""
        out = _git(repo.git_dir, "for-each-ref", "--format=%(refname:strip=2)%00%(objectname)%00%(*objectname)",
                   f"refs/{namespace}/").decode()
        rows = []
        for line in out.splitlines():
            name, obj, peeled = line.split("\0")
            rows.append((name, obj, peeled or obj))
        return rows

    def _zip(self, repo: Repo, sha: str) -> bytes:
        prefix = f"{repo.owner}-{repo.name}-{sha[:7]}/"
        key = (repo.git_dir, sha, prefix)
        with self._lock:
            cached = self._zip_cache.get(key)
        if cached is None:
            cached = _git(repo.git_dir, "archive", "--format=zip", f"--prefix={prefix}", sha)
            with self._lock:
                self._zip_cache[key] = cached
        return cached

    # -- JSON shapes ---------------------------------------------------------------------------

    def _repo_json(self, repo: Repo) -> dict:
        api, web = f"{self.api_url}/repos/{repo.full_name}", f"{self.url}/{repo.full_name}"
        return {
            "id": repo.id, "node_id": _node_id("Repository", repo.id), "name": repo.name,
            "full_name": repo.full_name, "private": repo.private, "fork": False, "archived": False,
            "disabled": False, "visibility": "private" if repo.private else "public", "description": None,
            "owner": {"login": repo.owner, "id": repo.id + 1_000_000, "type": "User",
                      "url": f"{self.api_url}/users/{repo.owner}", "html_url": f"{self.url}/{repo.owner}"},
            "html_url": web, "url": api, "clone_url": f"{web}.git",
            "branches_url": f"{api}/branches{{/branch}}", "tags_url": f"{api}/tags",
            "default_branch": repo.default_branch,
        }

    def _commit_json(self, repo: Repo, sha: str) -> dict:
        fmt = "%H%x00%T%x00%P%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%B"
        fields = _git(repo.git_dir, "show", "-s", f"--format={fmt}", sha).decode().split("\0")
        sha, tree, parents, an, ae, ad, cn, ce, cd, message = fields
        api = f"{self.api_url}/repos/{repo.full_name}"
        return {
            "sha": sha, "node_id": _node_id("Commit", sha), "url": f"{api}/commits/{sha}",
            "html_url": f"{self.url}/{repo.full_name}/commit/{sha}",
            "commit": {
                "author": {"name": an, "email": ae, "date": ad},
                "committer": {"name": cn, "email": ce, "date": cd},
                "message": message.rstrip("\n"),
                "tree": {"sha": tree, "url": f"{api}/git/trees/{tree}"},
                "url": f"{api}/git/commits/{sha}",
            },
            "parents": [{"sha": p, "url": f"{api}/commits/{p}"} for p in parents.split()],
        }

    # -- routing -------------------------------------------------------------------------------

    def _route_api(self, path: str, query: dict[str, list[str]], headers: HeaderDict | None = None) -> Response:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "repos":
            try:
                repo, rest = self.repo(parts[1], parts[2]), parts[3:]
            except KeyError:
                return _not_found()
        elif len(parts) >= 2 and parts[0] == "repositories":
            repo, rest = self._repo_by_id(parts[1]), parts[2:]
            if repo is None:
                return _not_found()
        else:
            return _not_found()
        if repo.private and not self._can_read_private(headers):
            return _not_found()  # GitHub hides a private repository: 404, not 403
        api = f"{self.api_url}/repos/{repo.full_name}"
        if not rest:
            return Response.json(200, self._repo_json(repo))
        kind, arg = rest[0], "/".join(rest[1:])
        if kind == "branches" and arg:
            sha = self._rev(repo, f"refs/heads/{arg}") if not _BAD_REF.search(arg) else None
            if sha is None:
                return Response.json(404, {"message": "Branch not found", "documentation_url": DOCS})
            return Response.json(200, {"name": arg, "commit": self._commit_json(repo, sha), "protected": False})
        if kind == "branches":
            items = [{"name": n, "commit": {"sha": c, "url": f"{api}/commits/{c}"}, "protected": False}
                     for n, _, c in sorted(self._refs(repo, "heads"))]
            return self._paginate(repo, "branches", items, query)
        if kind == "tags" and not arg:
            items = [{"name": n, "zipball_url": f"{api}/zipball/refs/tags/{n}",
                      "tarball_url": f"{api}/tarball/refs/tags/{n}",
                      "commit": {"sha": c, "url": f"{api}/commits/{c}"}, "node_id": _node_id("Ref", n)}
                     for n, _, c in sorted(self._refs(repo, "tags"), reverse=True)]
            return self._paginate(repo, "tags", items, query)
        if kind == "commits" and arg:
            sha = self._resolve(repo, arg)
            if sha is None:
                if _HEX_REF.fullmatch(arg):
                    return Response.json(422, {"message": f"No commit found for SHA: {arg}",
                                               "documentation_url": f"{DOCS}/commits/commits#get-a-commit"})
                return _not_found()
            return Response.json(200, self._commit_json(repo, sha))
        if kind == "compare" and "..." in arg:
            return self._compare(repo, *arg.split("...", 1))
        if kind == "zipball":
            return self._zipball_redirect(repo, arg or repo.default_branch, from_api=True)
        return _not_found()

    def _paginate(self, repo: Repo, what: str, items: list, query: dict[str, list[str]]) -> Response:
        per_page = min(max(_int(query.get("per_page"), 30), 1), 100)
        page = max(_int(query.get("page"), 1), 1)
        last = max((len(items) + per_page - 1) // per_page, 1)
        base = f"{self.api_url}/repositories/{repo.id}/{what}?per_page={per_page}&page="
        links = []
        if page > 1:
            links.append(f'<{base}{min(page - 1, last)}>; rel="prev"')
        if page < last:
            links += [f'<{base}{page + 1}>; rel="next"', f'<{base}{last}>; rel="last"']
        if page > 1:
            links.append(f'<{base}1>; rel="first"')
        headers = {"Link": ", ".join(links)} if links else {}
        return Response.json(200, items[(page - 1) * per_page: page * per_page], **headers)

    def _compare(self, repo: Repo, base: str, head: str) -> Response:
        base_sha, head_sha = self._resolve(repo, base), self._resolve(repo, head)
        if base_sha is None or head_sha is None:
            return _not_found()
        proc = subprocess.run(["git", "merge-base", base_sha, head_sha], cwd=repo.git_dir,
                              capture_output=True, env=_env())
        if proc.returncode != 0:
            return Response.json(404, {"message": f"No common ancestor between {base} and {head}.",
                                       "documentation_url": DOCS})
        merge_base = proc.stdout.decode().strip()
        ahead = int(_git(repo.git_dir, "rev-list", "--count", f"{base_sha}..{head_sha}"))
        behind = int(_git(repo.git_dir, "rev-list", "--count", f"{head_sha}..{base_sha}"))
        status = ("identical" if ahead == behind == 0 else "behind" if ahead == 0
                  else "ahead" if behind == 0 else "diverged")
        commits = _git(repo.git_dir, "rev-list", "--reverse", "--max-count=250",
                       f"{base_sha}..{head_sha}").decode().split()
        return Response.json(200, {
            "url": f"{self.api_url}/repos/{repo.full_name}/compare/{base}...{head}",
            "html_url": f"{self.url}/{repo.full_name}/compare/{base}...{head}",
            "status": status, "ahead_by": ahead, "behind_by": behind, "total_commits": ahead,
            "base_commit": {"sha": base_sha}, "merge_base_commit": {"sha": merge_base},
            "commits": [{"sha": c} for c in commits], "files": [],
        })

    def _can_read_private(self, headers: HeaderDict | None) -> bool:
        auth = (headers or HeaderDict()).get("authorization") or ""
        scheme, _, token = auth.partition(" ")
        return scheme.lower() in ("bearer", "token") and token in self.private_tokens

    def _zipball_redirect(self, repo: Repo, ref: str, *, from_api: bool = False) -> Response:
        if self._is_ambiguous(repo, ref):
            return Response.text(300, f"Multiple choices: {ref} is both a branch and a tag")
        if self._resolve(repo, ref) is None:
            return Response.text(404, "Not Found")
        location = f"{self.codeload_url}/{repo.full_name}/legacy.zip/{quote(ref, safe='/')}"
        if repo.private:
            # GitHub's answer for a private repository: codeload with credentials of its own that
            # last minutes, so the caller's token never needs to follow the redirect.
            token = base64.b32encode(os.urandom(15)).decode()
            with self._lock:
                self._archive_tokens[token] = (repo.full_name.lower(), time.time() + 300)
            location += f"?token={token}"
        return Response.redirect(location)

    def _route_web(self, path: str, query: dict[str, list[str]]) -> Response:
        if path.startswith("/files/"):
            with self._lock:
                data = self._files.get(path[len("/files/"):])
            if data is None:
                return Response.text(404, "Not Found")
            return Response(200, data, {"Content-Type": "application/octet-stream"})
        if path.startswith(("/repos/", "/repositories/")):
            # Answers API paths too, so an API request redirected here (redirect_api) succeeds;
            # it never sees the API's token (the client drops it), so private ones stay hidden.
            return self._route_api(path, query)
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[2] in ("zipball", "tree"):
            try:
                repo = self.repo(parts[0], parts[1])
            except KeyError:
                return Response.text(404, "Not Found")
            if repo.private:
                return Response.text(404, "Not Found")  # the web host knows no API token
            ref = "/".join(parts[3:]) or repo.default_branch
            if parts[2] == "tree":
                # The web page of a ref: torch.hub probes /tree/main/ to guess the default branch.
                if self._resolve(repo, ref) is None:
                    return Response.text(404, "Not Found")
                return Response.text(200, f"<html>{repo.full_name} at {ref}</html>", "text/html; charset=utf-8")
            return self._zipball_redirect(repo, ref)
        return Response.text(404, "Not Found")

    def _route_codeload(self, path: str, query: dict[str, list[str]] | None = None) -> Response:
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[2] == "legacy.zip":
            try:
                repo = self.repo(parts[0], parts[1])
            except KeyError:
                return Response.text(404, "Not Found")
            if repo.private:
                token = ((query or {}).get("token") or [""])[0]
                with self._lock:
                    granted = self._archive_tokens.get(token)
                if granted is None or granted[0] != repo.full_name.lower() or granted[1] < time.time():
                    return Response.text(404, "Not Found")
            sha = self._resolve(repo, "/".join(parts[3:]))
            if sha is None:
                return Response.text(404, "Not Found")
            return Response(200, self._zip(repo, sha), {
                "Content-Type": "application/zip",
                "Content-Disposition": f"attachment; filename={repo.owner}-{repo.name}-{sha[:7]}.zip",
            })
        return Response.text(404, "Not Found")

    def _gate_response(self, fault: Fault, target: str, raw_path: str) -> Response:
        if fault.kind == "rate_limit":
            headers = {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Used": "60", "X-RateLimit-Reset": str(int(time.time()) + 3600),
                       "X-RateLimit-Resource": "core"}
            if fault.opts.get("retry_after") is not None:
                headers["Retry-After"] = str(fault.opts["retry_after"])
            return Response.json(fault.opts.get("status", 403), {
                "message": "API rate limit exceeded for 127.0.0.1. (But here's the good news: "
                           "Authenticated requests get a higher rate limit. Check out the "
                           "documentation for more details.)",
                "documentation_url": f"{DOCS}/overview/resources-in-the-rest-api#rate-limiting"},
                **headers)
        if fault.kind == "unauthorized":
            return Response.json(401, {"message": "Bad credentials", "documentation_url": DOCS})
        if fault.kind == "redirect_api":
            return Response.redirect(f"{self.url}{raw_path}", fault.opts.get("status", 302))
        status = fault.opts.get("status", 500)
        if target == "api":
            return Response.json(status, {"message": "Server Error"})
        return Response.text(status, "Internal Server Error")

    def _auth_response(self, headers: HeaderDict) -> Response | None:
        token = self.require_token
        if token is None:
            return None
        auth = headers.get("authorization")
        if auth in (f"token {token}", f"Bearer {token}"):
            return None
        message = "Requires authentication" if auth is None else "Bad credentials"
        return Response.json(401, {"message": message, "documentation_url": DOCS})

    # -- request handling ----------------------------------------------------------------------

    def _handle(self, handler: "_Handler") -> None:
        server = handler.server.name
        raw_path = handler.path
        split = urlsplit(raw_path)
        path, query = unquote(split.path), parse_qs(split.query)
        target = "files" if server == "web" and path.startswith("/files/") else server
        record = RecordedRequest(server, target, handler.command, raw_path,
                                 HeaderDict(handler.headers.items()), time.time())
        with self._lock:
            self._log.append(record)
        try:
            fault = self._take_fault(GATE_FAULTS, target, path)
            if fault is not None:
                response = self._gate_response(fault, target, raw_path)
            elif handler.command not in ("GET", "HEAD"):
                response = Response.json(404, {"message": "Not Found", "documentation_url": DOCS})
            elif server == "api":
                response = self._auth_response(record.headers) or self._route_api(path, query, record.headers)
            elif server == "web":
                response = self._route_web(path, query)
            else:
                response = self._route_codeload(path, query)
        except Exception:  # report, don't hang the client
            import traceback
            self.errors.append(traceback.format_exc())
            response = Response.json(500, {"message": "emulator error"})
        record.status = response.status
        self._send(handler, response, target, path)

    def _send(self, handler: "_Handler", response: Response, target: str, path: str) -> None:
        body = response.body
        slow = cut = None
        if response.status == 200 and body:
            corrupt = self._take_fault(("corrupt",), target, path)
            if corrupt is not None:
                length = corrupt.opts.get("length", 16)
                offset = min(corrupt.opts.get("offset", len(body) // 2), max(len(body) - length, 0))
                mid = bytes(b ^ 0xFF for b in body[offset:offset + length])
                body = body[:offset] + mid + body[offset + len(mid):]
            if self._take_fault(("no_comment",), target, path) is not None:
                body = _without_zip_comment(body)
            slow = self._take_fault(("slow",), target, path)
            cut = self._take_fault(("cut_off",), target, path)
        handler.send_response(response.status)
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        if handler.command == "HEAD":
            return
        limit = len(body) if cut is None else min(int(cut.opts.get("after", len(body) // 2)), len(body))
        chunk = int(slow.opts.get("chunk", CHUNK)) if slow else CHUNK
        delay = min(float(slow.opts.get("delay", 0.05)), MAX_SLOW_DELAY) if slow else 0.0
        sent = 0
        while sent < limit:
            if delay:
                time.sleep(delay)
            piece = body[sent:min(sent + chunk, limit)]
            handler.wfile.write(piece)
            handler.wfile.flush()
            sent += len(piece)
        if cut is not None:
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    emulator: GitHubEmulator
    name: str

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client disconnects and the like: stay quiet


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "GitHubEmulator/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        try:
            self.server.emulator._handle(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


# -- helpers -----------------------------------------------------------------------------------


def _without_zip_comment(body: bytes) -> bytes:
    """A zip with its comment cut off: the end record's comment length set to 0, the comment dropped."""
    end = body.rfind(b"PK\x05\x06")
    if end < 0 or len(body) < end + 22:
        return body  # not a zip: nothing to strip
    return body[:end + 20] + b"\x00\x00"


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(_GIT_ENV)
    env.update(extra or {})
    return env


def _git(cwd: str, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> bytes:
    proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env=_env(env))
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _int(values: list[str] | None, default: int) -> int:
    try:
        return int(values[0]) if values else default
    except ValueError:
        return default


def _node_id(kind: str, value: object) -> str:
    return base64.b64encode(f"{kind}:{value}".encode()).decode()
