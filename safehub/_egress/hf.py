"""The Hugging Face Hub's download path, served by the parent to a worker (DESIGN 4b, issue 17).

A worker's ``hf_hub_download`` / ``snapshot_download`` (``worker/shims.py``) asks the parent for
a file or a snapshot of a Hub repository. The parent fetches it through the call's checked
connection (``connection.open_checked``: policy, caps, deadline, every redirect) and writes it into
the user's Hugging Face cache in huggingface_hub's own layout, so plain huggingface_hub finds it
afterwards, and safehub finds what huggingface_hub put there::

    $HF_HUB_CACHE/models--org--name/
        blobs/<etag>              the bytes (etag: sha256 for LFS files, the git blob id otherwise)
        snapshots/<commit>/<path> a relative link to ../../blobs/<etag>
        refs/<revision>           the commit a branch or tag resolved to
    $HF_HUB_CACHE/.locks/models--org--name/<etag>.lock   huggingface_hub's lock (filelock), shared

Why a writer of that layout and not huggingface_hub itself in the parent: the layout is
huggingface_hub's documented contract, the same in every release, while its HTTP layer is not
(requests in 0.x, httpx in 1.x, httpx2 in 2.x), its client is process-global (swapping it would
reroute the caller's own Hub traffic), and it need not be installed in the parent at all.

What is spoken, as by huggingface_hub: ``HEAD {endpoint}/{repo}/resolve/{revision}/{path}``
answers ``X-Repo-Commit`` and an ``ETag``; a large (LFS) file answers a redirect to its CDN with
``X-Linked-Etag`` and ``X-Linked-Size``, which the HEAD does not follow. The body then comes from
where the HEAD pointed, every hop checked again, and is kept only when its size and hash match
the etag (its sha256, or its git blob id; an ETag that is no hash, which the Hub never sends,
names the blob and is checked for size alone). ``GET {endpoint}/api/{type}s/{repo}/revision/{revision}``
gives a snapshot's commit and its files (``siblings``). Errors carry ``X-Error-Code``.

Trust: ``HF_TOKEN`` goes to ``HF_ENDPOINT``'s own origin only, never across a redirect (the CDN)
and never to an ``endpoint=`` a repository names; the worker never sees it. Offline
(``SAFEHUB_OFFLINE``, ``HF_HUB_OFFLINE``, or the call's ``local_files_only``) serves the cache
only. With a lock file, only pinned files are served, fetched at the pinned commit and checked
against the pinned sha256.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .. import _filelock, _http, _log, constants
from ..errors import FetchRefusedError, HubFileError, SafeHubError
from .connection import CheckedResponse, Credentials

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}\Z")
_REVISION = re.compile(r"[\w.-]+(?:/[\w.-]+)*\Z")
_COMMIT = re.compile(r"[0-9a-f]{40}\Z")
# An ETag names the blob file, so only a plain name passes; the Hub's are hashes (checked below).
_ETAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_SHA1, _SHA256 = re.compile(r"[0-9a-f]{40}\Z"), re.compile(r"[0-9a-f]{64}\Z")
MAX_PATH_CHARS = 1024
MAX_SNAPSHOT_FILES = 1000
MAX_API_BYTES = 16 * 1024**2  # a snapshot's listing is JSON in memory
_ERROR_KINDS = {"EntryNotFound": "entry_not_found", "RevisionNotFound": "revision_not_found",
                "RepoNotFound": "repository_not_found", "GatedRepo": "gated"}

# (url, method, headers, credentials, follow) -> an open response under the call's policy.
OpenURL = Callable[..., CheckedResponse]


@dataclass(frozen=True)
class HubRequest:
    """One file of a Hub repository, as a worker asked for it (checked; see :func:`request_from`)."""

    repo_type: str
    repo_id: str
    revision: str
    filename: str  # the path in the repository, subfolder included
    endpoint: str
    local_files_only: bool = False
    force_download: bool = False

    @property
    def folder_name(self) -> str:
        """huggingface_hub's ``repo_folder_name``: ``models--org--name``."""
        return "--".join([f"{self.repo_type}s", *self.repo_id.split("/")])

    def resolve_url(self, revision: str | None = None) -> str:
        quoted = urllib.parse.quote(revision or self.revision, safe="")
        return f"{self.endpoint}/{_URL_PREFIX[self.repo_type]}{self.repo_id}/resolve/{quoted}/{urllib.parse.quote(self.filename)}"

    def with_file(self, filename: str, revision: str) -> HubRequest:
        return HubRequest(self.repo_type, self.repo_id, revision, filename, self.endpoint, self.local_files_only, self.force_download)

    @property
    def shown(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{kind}{self.repo_id}@{self.revision}/{self.filename}" if self.filename else f"{kind}{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class HubServed:
    """A file in the Hugging Face cache, ready to show a worker."""

    request: HubRequest
    commit_sha: str
    snapshot_path: Path  # snapshots/<commit>/<filename>
    size: int
    sha256: str
    cached: bool


def request_from(args: dict[str, Any], *, with_file: bool = True) -> HubRequest:
    """Check a worker's request; raise ValueError saying what is wrong with it."""
    repo_type = args.get("repo_type") or "model"
    repo_id, revision = args.get("repo_id"), args.get("revision") or "main"
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {', '.join(REPO_TYPES)}, not {str(repo_type)[:40]!r}")
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"{str(repo_id)[:100]!r} is not a Hub repository id (org/name)")
    if not isinstance(revision, str) or len(revision) > 255 or not _REVISION.match(revision) or ".." in revision:
        raise ValueError(f"{str(revision)[:100]!r} is not a revision (a branch, tag or commit)")
    filename = ""
    if with_file:
        subfolder, name = args.get("subfolder") or "", args.get("filename")
        if not isinstance(subfolder, str) or not isinstance(name, str):
            raise ValueError("a Hub file is named by a str filename (and subfolder)")
        filename = check_path(f"{subfolder.strip('/')}/{name}" if subfolder else name)
    endpoint = args.get("endpoint") or constants.HF_ENDPOINT
    if not isinstance(endpoint, str) or not endpoint.lower().startswith(("http://", "https://")) or len(endpoint) > 512:
        raise ValueError(f"the Hub endpoint {str(endpoint)[:100]!r} is not an http(s) URL")
    return HubRequest(repo_type, repo_id, revision, filename, endpoint.rstrip("/"),
                      bool(args.get("local_files_only")), bool(args.get("force_download")))


def check_path(path: str) -> str:
    """A repository path as a relative POSIX path that stays inside its snapshot folder."""
    parts = path.split("/")
    if (len(path) > MAX_PATH_CHARS or not path or "\\" in path or re.search(r"[\x00-\x1f\x7f]", path)
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{path[:200]!r} is not a file path inside a repository")
    return path


def cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return constants.SAFEHUB_OFFLINE or constants.HF_HUB_OFFLINE


class HubFetcher:
    """Files and snapshots of Hub repositories for one call: fetched under its policy, cached in the
    user's Hugging Face cache. ``pins`` (a lock file's ``hub`` entries) restrict what is served."""

    def __init__(self, open_url: OpenURL, *, digest: Callable[[Path, bool], tuple[int, str]],
                 count: Callable[[str], None] = lambda what: None,
                 pins: dict[tuple[str, str, str, str], Any] | None = None) -> None:
        self._open = open_url
        self._digest = digest  # (path, pinned) -> (size, sha256) of a cached file; remembered unless pinned
        self._count = count  # each file of a snapshot counts against the call's fetches
        self.pins = pins

    # -- one file ------------------------------------------------------------------------------

    def file(self, request: HubRequest, *, commit_sha: str | None = None) -> HubServed:
        """The file ``request`` names, at ``commit_sha`` when a snapshot already resolved its revision."""
        storage = self._storage(request)
        pin = self._pin(request)
        revision = pin.commit_sha if pin is not None else commit_sha or request.revision
        # A commit already in the cache needs no network (huggingface_hub's shortcut).
        if _COMMIT.match(revision) and not request.force_download:
            served = self._cached(request, storage, revision, pin)
            if served is not None:
                return served
        if offline() or request.local_files_only:
            commit = revision if _COMMIT.match(revision) else _read_ref(storage, revision)
            served = self._cached(request, storage, commit, pin) if commit else None
            if served is None:
                why = "local_files_only=True" if request.local_files_only else _offline_setting()
                raise HubFileError(f"{request.shown} is not in the Hugging Face cache ({cache_dir()}) and {why} is set.",
                                   kind="local_entry_not_found", repo_id=request.repo_id, filename=request.filename)
            return served
        commit, etag, size, location = self._metadata(request, revision)
        if pin is not None and commit != pin.commit_sha:
            raise HubFileError(f"{request.shown}: the Hub answered commit {commit} for the pinned commit {pin.commit_sha}.",
                               kind="http", repo_id=request.repo_id, filename=request.filename)
        if commit != revision:
            _write_ref(storage, revision, commit)
        snapshot = _inside(storage, "snapshots", commit, request.filename)
        blob = _inside(storage, "blobs", etag)
        cached = (snapshot.exists() or blob.is_file()) and not request.force_download
        if not cached:
            with _filelock.locked(_inside(cache_dir(), ".locks", request.folder_name, f"{etag}.lock"), f"{request.shown}"):
                if request.force_download or not blob.is_file():
                    self._download(request, location, blob, etag, size, pin)
        if not snapshot.exists():
            _link_snapshot(blob, snapshot)
        served = self._cached(request, storage, commit, pin, cached=cached)
        if served is None:
            raise _missing(request)
        return served

    # -- a snapshot ----------------------------------------------------------------------------

    def snapshot(self, request: HubRequest, allow: list[str] | None, ignore: list[str] | None) -> tuple[str, list[HubServed]]:
        """Every file of the repository at ``request.revision`` that the patterns keep."""
        storage = self._storage(request)
        if self.pins is not None:
            commit, names = self._pinned_snapshot(request)
        elif offline() or request.local_files_only:
            known: str | None = request.revision if _COMMIT.match(request.revision) else _read_ref(storage, request.revision)
            folder = _inside(storage, "snapshots", known) if known else None
            if known is None or folder is None or not folder.is_dir():
                why = "local_files_only=True" if request.local_files_only else _offline_setting()
                raise HubFileError(f"no snapshot of {request.shown} is in the Hugging Face cache ({cache_dir()}) and {why} is set.",
                                   kind="local_entry_not_found", repo_id=request.repo_id, filename="")
            commit, names = known, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        else:
            commit, names = self._listing(request)
            if commit != request.revision:
                _write_ref(storage, request.revision, commit)
        kept = [name for name in names if _kept(name, allow, ignore)]
        if len(kept) > MAX_SNAPSHOT_FILES:
            raise HubFileError(f"{request.shown} has {len(kept)} files, more than {MAX_SNAPSHOT_FILES} one snapshot may fetch; "
                               "narrow it with allow_patterns", kind="http", repo_id=request.repo_id, filename="")
        served = []
        for name in kept:
            self._count(f"{request.repo_id}/{name}")
            served.append(self.file(request.with_file(name, request.revision), commit_sha=commit))
        return commit, served

    # -- the Hub -------------------------------------------------------------------------------

    def _metadata(self, request: HubRequest, revision: str) -> tuple[str, str, int | None, str]:
        """(commit, etag, size, where the bytes are) from a HEAD of the resolve URL."""
        url = request.resolve_url(revision)
        with self._request(request, url, "HEAD", follow="same_origin") as response:
            headers = response.headers
            location = urllib.parse.urljoin(response.final_url, headers.get("Location") or "") if response.status in (301, 302, 303, 307, 308) else response.final_url
        commit = (headers.get("X-Repo-Commit") or "").strip()
        etag = _normal_etag(headers.get("X-Linked-Etag") or headers.get("ETag"))
        size_text = headers.get("X-Linked-Size") or (None if location != response.final_url else headers.get("Content-Length"))
        if not _COMMIT.match(commit) or etag is None:
            raise HubFileError(f"{url} did not answer like a Hugging Face Hub (no X-Repo-Commit or ETag); "
                               f"check HF_ENDPOINT ({constants.HF_ENDPOINT}).", kind="http", repo_id=request.repo_id,
                               filename=request.filename)
        size = int(size_text) if size_text and size_text.strip().isdigit() else None
        return commit, etag, size, location

    def _listing(self, request: HubRequest) -> tuple[str, list[str]]:
        url = (f"{request.endpoint}/api/{request.repo_type}s/{request.repo_id}/revision/"
               f"{urllib.parse.quote(request.revision, safe='')}")
        with self._request(request, url, "GET") as response:
            body = response.read(MAX_API_BYTES + 1)
        try:
            if len(body) > MAX_API_BYTES:
                raise ValueError("too long")
            info = json.loads(body)
            commit, names = info["sha"], [s["rfilename"] for s in info["siblings"]]
            if not isinstance(commit, str) or not _COMMIT.match(commit):
                raise ValueError(commit)
            return commit, [check_path(name) for name in names if isinstance(name, str)]
        except (ValueError, KeyError, TypeError) as exc:
            raise HubFileError(f"{url} did not answer a repository's files ({type(exc).__name__}); check HF_ENDPOINT.",
                               kind="http", repo_id=request.repo_id, filename="") from None

    def _download(self, request: HubRequest, location: str, blob: Path, etag: str, size: int | None, pin: Any) -> None:
        """The bytes into ``blob``: a temporary file beside it, renamed only once size and hash match."""
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f"{blob.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.incomplete")
        try:
            try:
                with self._request(request, location, "GET") as response, open(tmp, "wb") as out:
                    got, sha256 = _http.stream_to_file(response, out)
                    _log.info(f"Downloaded {request.shown} ({got} bytes) into the Hugging Face cache")
            except FetchRefusedError as exc:
                raise FetchRefusedError(f"{exc.message.rstrip('.')} (where the Hub sends {request.shown}).", **exc._facts) from None
            # The Hub's ETag is the file's sha256 (LFS) or its git blob id (some mirrors: its sha1).
            with open(tmp, "rb") as f:
                sha1s = _sha1s(f, got) if _SHA1.match(etag) else None
            expected = pin.sha256 if pin is not None else (etag if _SHA256.match(etag) else None)
            if size is not None and got != size:
                raise HubFileError(f"{request.shown} is {got} bytes; the Hub said {size}. Nothing was kept; try again.",
                                   kind="http", repo_id=request.repo_id, filename=request.filename)
            if (expected is not None and sha256 != expected) or (sha1s is not None and etag not in sha1s):
                what = "the lock file pins" if pin is not None else "its ETag names"
                raise HubFileError(f"{request.shown} is not the file {what} (sha256 {sha256[:16]}...); nothing was kept.",
                                   kind="integrity", repo_id=request.repo_id, filename=request.filename)
            tmp.chmod(0o644)  # huggingface_hub's blobs are readable by all (umask aside); a dropped worker reads it
            os.replace(tmp, blob)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def _request(self, request: HubRequest, url: str, method: str, follow: str = "all") -> Iterator[CheckedResponse]:
        token = constants.HF_TOKEN
        credentials = Credentials(constants.HF_ENDPOINT, {"Authorization": f"Bearer {token}"}) if token else None
        try:
            response = self._open(url, method=method, credentials=credentials, follow=follow)
        except _http.HTTPStatusError as exc:
            raise _status_error(request, exc) from None
        with response:
            yield response

    # -- the cache -----------------------------------------------------------------------------

    def _storage(self, request: HubRequest) -> Path:
        return _inside(cache_dir(), request.folder_name)

    def _cached(self, request: HubRequest, storage: Path, commit: str | None, pin: Any, *, cached: bool = True) -> HubServed | None:
        if commit is None or not _COMMIT.match(commit):
            return None
        snapshot = _inside(storage, "snapshots", commit, request.filename)
        if not snapshot.is_file():
            return None
        size, sha256 = self._digest(snapshot.resolve(), pin is not None)
        if pin is not None and sha256 != pin.sha256:
            raise HubFileError(f"{snapshot} is not the file the lock file pins for {request.shown} (sha256 differs); "
                               "remove it to fetch the pinned one, or run `safehub lock --load` again",
                               kind="integrity", repo_id=request.repo_id, filename=request.filename)
        return HubServed(request, commit, snapshot, size, sha256, cached)

    def _pin(self, request: HubRequest) -> Any:
        if self.pins is None:
            return None
        pin = self.pins.get((request.repo_type, request.repo_id, request.revision, request.filename))
        if pin is None:
            raise FetchRefusedError(f"Refusing to fetch {request.shown}: the lock file pins no such Hub file; a locked load "
                                    "fetches only what was pinned (`safehub lock REPO --load ENTRYPOINT` pins what a load fetches).",
                                    url=request.resolve_url(), reason="url")
        return pin

    def _pinned_snapshot(self, request: HubRequest) -> tuple[str, list[str]]:
        assert self.pins is not None
        key = (request.repo_type, request.repo_id, request.revision)
        pins = [pin for (kind, repo_id, revision, _), pin in self.pins.items() if (kind, repo_id, revision) == key]
        if not pins:
            raise FetchRefusedError(f"Refusing to fetch {request.shown}: the lock file pins no snapshot of it.",
                                    url=request.resolve_url(), reason="url")
        return pins[0].commit_sha, sorted(pin.filename for pin in pins)


def _status_error(request: HubRequest, exc: _http.HTTPStatusError) -> SafeHubError:
    headers = {k.lower(): v for k, v in dict(exc.headers).items()}
    kind = _ERROR_KINDS.get(headers.get("x-error-code", ""))
    if kind is None and exc.status == 401:
        kind = "repository_not_found"  # the Hub answers 401 for a missing or private repository
    what = {"entry_not_found": f"{request.filename!r} is not in {request.repo_id} at {request.revision}",
            "revision_not_found": f"{request.repo_id} has no revision {request.revision!r}",
            "repository_not_found": f"the Hub has no repository {request.repo_id} you may read (a private or gated one needs HF_TOKEN)",
            "gated": f"{request.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN",
            }.get(kind or "", f"the Hub answered HTTP {exc.status} for {exc.url}")
    return HubFileError(f"{what} (HTTP {exc.status}).", kind=kind or "http", repo_id=request.repo_id, filename=request.filename)


def _missing(request: HubRequest) -> HubFileError:
    return HubFileError(f"{request.shown} vanished from the cache while it was served; try again.", kind="http",
                        repo_id=request.repo_id, filename=request.filename)


def _offline_setting() -> str:
    return "SAFEHUB_OFFLINE" if constants.SAFEHUB_OFFLINE else "HF_HUB_OFFLINE"


def _inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused if it leaves ``root`` (like huggingface_hub's ``_get_pointer_path``)."""
    path = root.joinpath(*parts)
    if not os.path.normpath(path).startswith(os.path.normpath(root) + os.sep):
        raise ValueError(f"{'/'.join(parts)[:200]!r} leaves {root}")
    return path


def _read_ref(storage: Path, revision: str) -> str | None:
    try:
        commit = _inside(storage, "refs", revision).read_text().strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.match(commit) else None


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    ref = _inside(storage, "refs", revision)
    if _read_ref(storage, revision) == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(commit)
    os.replace(tmp, ref)  # readers never see a half-written ref


def _link_snapshot(blob: Path, snapshot: Path) -> None:
    """``snapshots/<commit>/<path>`` -> ``../../blobs/<etag>``, as huggingface_hub links it."""
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_name(f".{snapshot.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(os.path.relpath(blob, snapshot.parent), tmp)
    os.replace(tmp, snapshot)


def _normal_etag(value: str | None) -> str | None:
    if not value:
        return None
    etag = value.strip().removeprefix("W/").strip('"')
    etag = etag.lower() if _SHA1.match(etag.lower()) or _SHA256.match(etag.lower()) else etag
    return etag if _ETAG.match(etag) else None


def _sha1s(f: Any, size: int) -> tuple[str, str]:
    """The git blob id and the plain sha1 of a file's bytes."""
    git, plain = hashlib.sha1(b"blob %d\0" % size), hashlib.sha1()
    for chunk in iter(lambda: f.read(1024 * 1024), b""):
        git.update(chunk)
        plain.update(chunk)
    return git.hexdigest(), plain.hexdigest()


def _kept(name: str, allow: list[str] | None, ignore: list[str] | None) -> bool:
    """huggingface_hub's ``filter_repo_objects``: a pattern ending in "/" means the folder's contents."""
    def norm(patterns: list[str] | None) -> list[str] | None:
        return None if patterns is None else [p + "*" if p.endswith("/") else p for p in patterns]

    allow, ignore = norm(allow), norm(ignore)
    if allow is not None and not any(fnmatch.fnmatch(name, p) for p in allow):
        return False
    return ignore is None or not any(fnmatch.fnmatch(name, p) for p in ignore)


def snapshot_relative(served: HubServed) -> PurePosixPath:
    """Where a served file sits in a Hugging Face cache: ``models--org--name/snapshots/<commit>/<path>``."""
    return PurePosixPath(served.request.folder_name, "snapshots", served.commit_sha, served.request.filename)
