"""A loopback Hugging Face Hub for the test suite: the endpoint and a CDN origin, on 127.0.0.1.

It answers the way the real Hub does, as far as ``huggingface_hub`` (and safehub's parent) read
it::

    with HubEmulator() as hub:
        commit = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": data})
        hub.endpoint, hub.cdn_url

- ``HEAD``/``GET {endpoint}/{repo}/resolve/{revision}/{path}`` (``datasets/`` and ``spaces/``
  prefixes for other repository types): ``X-Repo-Commit``, ``ETag`` (the git blob id, quoted),
  ``Content-Length``. A large (LFS) file answers ``302`` to the CDN origin, with
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``; the CDN serves ``/lfs/{sha256}``. A
  missing repository, revision or file answers ``X-Error-Code`` ``RepoNotFound`` (401),
  ``RevisionNotFound`` or ``EntryNotFound`` (404), as the Hub does.
- ``GET {endpoint}/api/{models|datasets|spaces}/{repo}[/revision/{revision}]``: the repository's
  info with ``sha`` and ``siblings`` (what ``snapshot_download`` read before the tree listing);
  ``GET .../tree/{revision}[/{path}]``: the recursive listing newer releases read.
- A private repository answers ``RepoNotFound`` unless ``Authorization: Bearer {token}``.

Every request is logged (origin, method, path, Authorization). ``tamper(sha256, data)`` makes the
CDN serve other bytes for a blob; ``forge(path, status, headers)`` makes the endpoint answer a path
with exactly that (a hostile or broken Hub). Standard library only; the servers run in daemon threads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

REPO_TYPES = {"": "model", "datasets": "dataset", "spaces": "space"}
API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's bytes: what the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


@dataclass
class Logged:
    origin: str  # "hub" or "cdn"
    method: str
    path: str
    authorization: str | None


@dataclass
class HubRepo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    lfs: dict[str, bool] = field(default_factory=dict)  # path -> stored in LFS


class HubEmulator:
    """The Hub endpoint and its CDN, each a ThreadingHTTPServer on a loopback port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes the CDN serves
        self.log: list[Logged] = []
        self.token: str | None = None  # what private repositories require
        self.forged: dict[str, tuple[int, dict[str, str]]] = {}  # path -> the endpoint's whole answer
        self._lock = threading.Lock()
        self._hub = _serve(host, self, "hub")
        self._cdn = _serve(host, self, "cdn")
        self.endpoint = f"http://{host}:{self._hub.server_address[1]}"
        self.cdn_url = f"http://{host}:{self._cdn.server_address[1]}"

    def __enter__(self) -> HubEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    @property
    def hosts(self) -> tuple[str, str]:
        """``host:port`` of the endpoint and the CDN, as SAFEHUB_ALLOW_HOSTS takes them."""
        return urlsplit(self.endpoint).netloc, urlsplit(self.cdn_url).netloc

    # -- content -------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", branch: str = "main",
                 private: bool = False, lfs: set[str] | None = None) -> str:
        """Create a repository with one commit on ``branch``; return the commit's sha."""
        repo = HubRepo(repo_type, repo_id, private)
        self.repos[(repo_type, repo_id)] = repo
        return self.commit(repo_id, files, repo_type=repo_type, branch=branch, lfs=lfs)

    def commit(self, repo_id: str, files: dict[str, bytes | None], *, repo_type: str = "model", branch: str = "main",
               lfs: set[str] | None = None) -> str:
        """A new commit on ``branch`` changing ``files`` (None deletes one); return its sha."""
        repo = self.repos[(repo_type, repo_id)]
        tree = dict(repo.commits.get(repo.refs.get(branch, ""), {}))
        for path, data in files.items():
            if data is None:
                tree.pop(path, None)
                continue
            tree[path] = data
            repo.lfs[path] = path in lfs if lfs is not None else path.endswith(LFS_SUFFIXES)
            if repo.lfs[path]:
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        sha = hashlib.sha1(json.dumps([repo_id, branch, len(repo.commits), sorted((p, git_blob_id(d)) for p, d in tree.items())]).encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        return sha

    def tag(self, repo_id: str, name: str, sha: str, *, repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)].refs[name] = sha

    def tamper(self, sha256: str, data: bytes) -> None:
        """Have the CDN serve ``data`` for the blob ``sha256`` (a compromised or broken mirror)."""
        self.blobs[sha256] = data

    def forge(self, path: str, status: int, headers: dict[str, str]) -> None:
        self.forged[path] = (status, headers)

    def requests(self, origin: str | None = None) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if origin is None or r.origin == origin]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def resolve_url(self, repo_id: str, filename: str, revision: str = "main", repo_type: str = "model") -> str:
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        return f"{self.endpoint}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    # -- requests ------------------------------------------------------------------------------

    def handle(self, origin: str, request: BaseHTTPRequestHandler) -> None:
        auth = request.headers.get("Authorization")
        with self._lock:
            self.log.append(Logged(origin, request.command, request.path, auth))
        path = urlsplit(request.path).path
        if origin == "hub" and path in self.forged:
            return _send(request, *self.forged[path], b"")
        if origin == "cdn":
            return self._cdn_get(request, path)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts and parts[0] == "api" and len(parts) >= 3 and parts[1] in API_KINDS:
            return self._api(request, API_KINDS[parts[1]], parts[2:], auth)
        repo_type = REPO_TYPES.get(parts[0], "model") if parts else "model"
        if parts and parts[0] in ("datasets", "spaces"):
            parts = parts[1:]
        if "resolve" in parts[1:3]:
            at = parts.index("resolve", 1)
            if len(parts) >= at + 3:
                return self._resolve(request, repo_type, "/".join(parts[:at]), parts[at + 1], "/".join(parts[at + 2:]), auth)
        _send(request, 404, {"X-Error-Code": "RepoNotFound"}, b"not found")

    def _repo(self, repo_type: str, repo_id: str, auth: str | None) -> HubRepo | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and auth != f"Bearer {self.token}"):
            return None
        return repo

    def _sha(self, repo: HubRepo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        return revision if revision in repo.commits else None

    def _resolve(self, request: BaseHTTPRequestHandler, repo_type: str, repo_id: str, revision: str, filename: str,
                 auth: str | None) -> None:
        repo = self._repo(repo_type, repo_id, auth)
        if repo is None:
            return _send(request, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"")
        sha = self._sha(repo, revision)
        if sha is None:
            return _send(request, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"")
        data = repo.commits[sha].get(filename)
        if data is None:
            return _send(request, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                        "X-Repo-Commit": sha}, b"")
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if repo.lfs.get(filename):
            digest = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{git_blob_id(lfs_pointer(data))}"', "X-Linked-Etag": f'"{digest}"',
                            "X-Linked-Size": str(len(data)), "Location": f"{self.cdn_url}/lfs/{digest}?name={quote(filename)}"})
            return _send(request, 302, headers, b"")
        headers["ETag"] = f'"{git_blob_id(data)}"'
        _send(request, 200, headers, data)

    def _cdn_get(self, request: BaseHTTPRequestHandler, path: str) -> None:
        digest = path.rsplit("/", 1)[-1]
        data = self.blobs.get(digest) if path.startswith("/lfs/") else None
        if data is None:
            return _send(request, 404, {}, b"no such blob")
        _send(request, 200, {"ETag": f'"{digest}"', "Content-Type": "application/octet-stream"}, data)

    def _api(self, request: BaseHTTPRequestHandler, repo_type: str, rest: list[str], auth: str | None) -> None:
        # /api/models/{repo}[/revision/{rev}] and /api/models/{repo}/tree/{rev}[/{path}]; repo is one or two parts.
        for size in (2, 1):
            repo_id, tail = "/".join(rest[:size]), rest[size:]
            repo = self._repo(repo_type, repo_id, auth)
            if repo is not None:
                break
        else:
            return _send(request, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"")
        if tail and tail[0] not in ("revision", "tree") or (tail and len(tail) < 2):
            return _send(request, 404, {}, b"")
        sha = self._sha(repo, tail[1] if tail else "main")
        if sha is None:
            return _send(request, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"")
        files = repo.commits[sha]
        if tail and tail[0] == "tree":
            under = "/".join(tail[2:])
            body = json.dumps(self._tree(repo, files, under)).encode()
        else:
            body = json.dumps({
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": sha, "private": repo.private, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "createdAt": "2026-01-01T00:00:00.000Z",
                "lastModified": "2026-01-01T00:00:00.000Z", "siblings": [{"rfilename": p} for p in sorted(files)],
            }).encode()
        _send(request, 200, {"Content-Type": "application/json", "X-Repo-Commit": sha}, body)

    def _tree(self, repo: HubRepo, files: dict[str, bytes], under: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(files):
            if under and not path.startswith(under.rstrip("/") + "/"):
                continue
            parents = path.split("/")[:-1]
            folders.update("/".join(parents[: i + 1]) for i in range(len(parents)))
            data = files[path]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if repo.lfs.get(path):
                pointer = lfs_pointer(data)
                entry.update(oid=git_blob_id(pointer), lfs={"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                                              "pointerSize": len(pointer)})
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders) if not under or f.startswith(under.rstrip("/") + "/")]
        return entries


def _send(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


def _serve(host: str, hub: HubEmulator, origin: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            try:
                hub.handle(origin, self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    server = Server((host, 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
