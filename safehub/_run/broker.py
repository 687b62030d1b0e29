"""The fetch broker: the parent's answers to what a worker asks for mid-call (DESIGN 4b).

The worker has no network. Its shims (``worker/shims.py``) ask for three things, each a handler
of :meth:`Broker.handlers` for ``call.run_isolated``:

- ``fetch`` {url, name, place, hash_prefix, progress}: a file, as torch.hub's
  ``download_url_to_file`` would make it. Downloaded through safehub's own path (temporary file,
  file lock, Content-Length, hash, atomic move, progress on the caller's stderr) into torch.hub's
  layout: ``<hub_dir>/checkpoints/<name>``, or ``<torch_home>/checkpoints/<name>`` for
  ``place="checkpoints"``, so plain torch.hub finds the same files. A file already there is used
  as it is, with no network (torch.hub's rule), also offline. The answer is its path in the
  call's view (``view.py``).
- ``get`` {url}: a plain GET's body (urllib, requests), at most ``MAX_GET_BYTES``, in a sealed memfd.
- ``hf_file`` {repo_id, filename, subfolder, repo_type, revision, endpoint, local_files_only,
  force_download} and ``hf_snapshot`` {repo_id, repo_type, revision, allow_patterns,
  ignore_patterns, ...}: the Hugging Face Hub's ``hf_hub_download`` and ``snapshot_download``,
  fetched into the user's Hugging Face cache in huggingface_hub's layout (``_hf``); the answer is
  the file's (or snapshot folder's) path in the view's ``huggingface/hub``, or, when the Hub or
  the cache lacks it, {error, message} for the worker to raise as huggingface_hub would.
- ``repo`` {github, force_reload, skip_validation, trust_repo, calling_fn}: a nested
  ``torch.hub.load`` / ``list`` / ``help``, through the parent's whole pipeline (``nested``,
  given by ``_api``); the answer is the repository's tree in the view.

The broker is the worker's way out, so it is strict. URLs: http and https only, the policy of
``_egress`` (no loopback, private, link-local or otherwise non-global address unless allowed)
checked on every address and redirect. Names: a plain file name, never a path, a link or a
hidden or lock file. Caps: fetches per call, bytes per GET, URL length. Every fetch is recorded
(:class:`BrokeredFetch`) and logged; ``recording()`` hands them to a caller (the CLI's --json).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import _cache, _egress, _hf, _log, constants
from .._sandbox import Sandbox
from .call import AskHandler, Refusal
from .view import CallView

MAX_FETCHES = 256  # files, GETs and nested repositories one call may ask for
MAX_GET_BYTES = 256 * 1024**2  # a GET's body travels in memory
MAX_URL_CHARS = 8192
# A file name torch.hub could have made from a URL, and nothing that is a path or a lock.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,254}\Z")
_RESERVED_SUFFIXES = (".lock", ".partial")

_recorded: contextvars.ContextVar[list[BrokeredFetch] | None] = contextvars.ContextVar("safehub_fetches", default=None)


@dataclass(frozen=True)
class BrokeredFetch:
    """One thing a worker fetched: what it asked for, what it got, and whether the cache had it."""

    kind: str  # "file", "get" or "repo"
    url: str  # for a repository, owner/repo[:ref] as asked
    final_url: str
    size: int
    sha256: str  # for a repository, its archive's
    cached: bool
    path: str = ""  # where the parent keeps it
    commit_sha: str = ""  # a repository's commit
    hub_file: tuple[str, str, str, str] | None = None  # a Hub file: repo_type, repo_id, revision, filename

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def recording() -> Iterator[list[BrokeredFetch]]:
    """Collect the fetches of every isolated call made inside the block (this thread or task)."""
    fetches: list[BrokeredFetch] = []
    token = _recorded.set(fetches)
    try:
        yield fetches
    finally:
        _recorded.reset(token)


NestedRepo = Callable[[dict[str, Any]], Any]  # args -> the repository's cache entry (_cache.CacheEntry)


class Broker:
    """What one call's worker may fetch, and the view it sees the results in."""

    def __init__(self, sandbox: Sandbox, *, nested: NestedRepo | None = None, file_pins: dict[str, Any] | None = None,
                 hub_pins: dict[Any, Any] | None = None) -> None:
        self.sandbox = sandbox
        self.nested = nested
        # With a lock file: URL -> _pins.FilePin; only those are served, each hash checked first.
        self.file_pins = file_pins
        self.hub_pins = hub_pins  # with a lock file: the Hub files it pins (_pins.HubPin by key)
        # One policy, budget and deadline for the whole call: every connection of every fetch.
        self.policy = _egress.FetchPolicy.for_sandbox(sandbox)
        self.budget = _egress.CallBudget()
        self.deadline = _egress.Deadline(sandbox.timeout)
        self.view = CallView()
        self.records: list[BrokeredFetch] = []
        self.count = 0

    def close(self) -> None:
        self.view.remove()
        sink = _recorded.get()
        if sink is not None:
            sink.extend(self.records)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open_url(self, url: str, **options: Any) -> Any:
        """A response for ``url`` under the call's policy (addresses checked and pinned, caps);
        ``options`` as ``_egress.open_checked`` takes them (method, headers, credentials, follow)."""
        return _egress.open_checked(url, policy=self.policy, budget=self.budget, deadline=self.deadline, **options)

    def handlers(self) -> dict[str, AskHandler]:
        return {"fetch": self.fetch, "get": self.get, "repo": self.repo, "hf_file": self.hf_file, "hf_snapshot": self.hf_snapshot}

    # -- the handlers --------------------------------------------------------------------------

    def fetch(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        url = self._url(args)
        name, place = args.get("name"), args.get("place", "hub/checkpoints")
        hash_prefix, progress = args.get("hash_prefix"), args.get("progress", True)
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith(_RESERVED_SUFFIXES):
            raise Refusal(f"the file name {str(name)[:80]!r} is not a plain file name")
        if place not in ("hub/checkpoints", "checkpoints"):
            raise Refusal(f"files are kept in the checkpoints folders, not {str(place)[:40]!r}")
        if hash_prefix is not None and (not isinstance(hash_prefix, str) or not re.fullmatch(r"[0-9a-fA-F]{1,64}", hash_prefix)):
            raise Refusal(f"the hash prefix {str(hash_prefix)[:80]!r} is not hexadecimal")
        folder = _cache.hub_path() / "checkpoints" if place == "hub/checkpoints" else _torch_home() / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        pinned = self._pinned(url)
        cached = path.is_file() and not path.is_symlink()
        if cached and pinned is not None and _digest(path, trust_memo=False)[1] != pinned.sha256:
            raise Refusal(f"{path} is not the file the lock file pins for {url[:500]} (sha256 differs); "
                          "remove it to fetch the pinned one, or run `safehub lock --load` again")
        if not cached:
            self._may_download(url)
            # A pinned file is checked against its whole sha256 before it is moved into place.
            with _told_to_the_worker():
                _download_to(url, path, pinned.sha256 if pinned else hash_prefix, bool(progress), self.open_url)
        size, digest = _digest(path)
        self._record(BrokeredFetch("file", url, url, size, digest, cached, str(path)))
        return {"path": str(self.view.add_file(path, place, name))}, [], []

    def get(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        url = self._url(args)
        method = args.get("method", "GET")
        if method not in ("GET", "HEAD"):
            raise Refusal(f"only GET and HEAD go through the parent, not {str(method)[:20]}")
        pinned = self._pinned(url) if method == "GET" else None
        self._may_download(url)
        fd = os.memfd_create("safehub-get", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with _told_to_the_worker():
                # A HEAD's redirect goes back as it came: the worker's client follows it (or not), asking again.
                opener = functools.partial(self.open_url, method=method, follow="all" if method == "GET" else "none")
                value, size, digest = _get_into(url, fd, opener)
            if pinned is not None and digest != pinned.sha256:
                raise Refusal(f"the body of {url[:500]} is not what the lock file pins (sha256 {digest[:16]}..., "
                              f"pinned {pinned.sha256[:16]}...); run `safehub lock --load` again if the change is expected")
            # Sealed: the worker reads the body and can change nothing the parent keeps.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        if method == "GET":
            self._record(BrokeredFetch("get", url, value["url"], size, digest, False))
        return value, [], [fd]

    def hf_file(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        request = self._hub_request(args, with_file=True)
        served = self._hub_served(lambda: [self._hub().file(request)])
        if isinstance(served, dict):
            return served, [], []
        path = self.view.add_hub_file(served[0], _hf.snapshot_relative(served[0]))
        return {"path": str(path), "commit": served[0].commit_sha}, [], []

    def hf_snapshot(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        request = self._hub_request(args, with_file=False)
        patterns = [_patterns(args.get(name)) for name in ("allow_patterns", "ignore_patterns")]
        commits: list[str] = []

        def fetch() -> list[_hf.HubServed]:
            commit, files = self._hub().snapshot(request, *patterns)
            commits.append(commit)
            return files

        served = self._hub_served(fetch)
        if isinstance(served, dict):
            return served, [], []
        folder = self.view.hub_snapshot(request.folder_name, commits[0], request.revision)
        for item in served:
            self.view.add_hub_file(item, _hf.snapshot_relative(item))
        return {"path": str(folder), "commit": commits[0]}, [], []
    def repo(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        if not self.sandbox.fetch:
            raise Refusal("fetches are switched off for this call (Sandbox(fetch=False))")
        if self.nested is None:
            raise Refusal("nested hub repositories are not served here")
        self._count()
        github = args.get("github")
        if not isinstance(github, str) or len(github) > 512:
            raise Refusal("a nested load names its repository as owner/repo[:ref]")
        from ..errors import SafeHubError

        try:
            entry = self.nested(args)
        except SafeHubError as exc:
            raise Refusal(f"the nested repository {github[:200]} cannot be loaded: {exc}") from None
        self._record(BrokeredFetch("repo", github, github, 0, entry.archive_sha256, True, str(entry.repo_dir), entry.commit_sha))
        return {"path": str(self.view.add_tree(entry.repo_dir, entry.repo_dir.name))}, [], []

    # -- the Hugging Face Hub ------------------------------------------------------------------

    def _hub(self) -> _hf.HubFetcher:
        return _hf.HubFetcher(self.open_url, digest=lambda path, pinned: _digest(path, trust_memo=not pinned), pins=self.hub_pins)

    def _hub_request(self, args: dict[str, Any], *, with_file: bool) -> _hf.HubRequest:
        if not self.sandbox.fetch:
            raise Refusal("fetches are switched off for this call (Sandbox(fetch=False))")
        self._count()
        try:
            return _hf.request_from(args, with_file=with_file)
        except ValueError as exc:
            raise Refusal(str(exc)) from None

    def _hub_served(self, fetch: Callable[[], list[_hf.HubServed]]) -> list[_hf.HubServed] | dict[str, Any]:
        """Files fetched and recorded; a file the Hub or the cache lacks is the worker's to raise
        as huggingface_hub would ({error, message}); a refusal or a failed download is refused."""
        from ..errors import HubFileError, SafeHubError

        try:
            served = fetch()
        except HubFileError as exc:
            if exc.kind == "integrity":
                raise Refusal(str(exc)) from None
            return {"error": exc.kind, "message": str(exc)}
        except (SafeHubError, ValueError) as exc:
            raise Refusal(str(exc)) from None
        for item in served:
            request = item.request
            self._record(BrokeredFetch("hf", request.resolve_url(), request.resolve_url(item.commit_sha), item.size, item.sha256,
                                       item.cached, str(item.snapshot_path), item.commit_sha,
                                       (request.repo_type, request.repo_id, request.revision, request.filename)))
        return served

    # -- rules ---------------------------------------------------------------------------------

    def _url(self, args: dict[str, Any]) -> str:
        if not self.sandbox.fetch:
            raise Refusal("fetches are switched off for this call (Sandbox(fetch=False))")
        self._count()
        url = args.get("url")
        if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
            raise Refusal(f"a URL is a str of at most {MAX_URL_CHARS} characters")
        if not url.lower().startswith(("http://", "https://")):
            raise Refusal(f"only http and https URLs are fetched, not {url[:200]!r}")
        return url

    def _pinned(self, url: str) -> Any:
        """The lock file's pin of ``url`` (None without a lock); a URL it does not pin is refused."""
        if self.file_pins is None:
            return None
        pin = self.file_pins.get(url)
        if pin is None:
            raise Refusal(f"the lock file pins no file at {url[:500]}; a locked load fetches only what was pinned "
                          "(`safehub lock REPO --load ENTRYPOINT` pins what a load fetches)")
        return pin

    def _may_download(self, url: str) -> None:
        if constants.SAFEHUB_OFFLINE:
            raise Refusal(f"{url[:500]} is not in the cache and SAFEHUB_OFFLINE is set")

    def _count(self) -> None:
        self.count += 1
        if self.count > MAX_FETCHES:
            raise Refusal(f"a call may fetch at most {MAX_FETCHES} things")

    def _record(self, record: BrokeredFetch) -> None:
        self.records.append(record)
        source = "from the cache" if record.cached else f"{record.size} bytes"
        _log.info(f"the worker fetched {record.url[:500]} ({record.kind}, {source}, sha256 {record.sha256[:16] or '-'})")


@contextlib.contextmanager
def _told_to_the_worker() -> Iterator[None]:
    """A failed download (status, hash, cut-off body, unreachable host) is the worker's to handle,
    as torch.hub's errors are: it gets the message as a refusal, and this call goes on."""
    from ..errors import SafeHubError

    try:
        yield
    except SafeHubError as exc:
        raise Refusal(str(exc)) from None


def _get_into(url: str, fd: int, open_url: Any) -> tuple[dict[str, Any], int, str]:
    """A GET's body into ``fd`` (at most MAX_GET_BYTES): (status, final URL and headers; size; sha256).

    An error status is the worker's to see, as urllib would show it: its body comes along."""
    from .. import _http

    try:
        response = open_url(url)
    except _http.HTTPStatusError as exc:
        body = exc.body[:MAX_GET_BYTES]
        os.write(fd, body)
        return {"status": exc.status, "url": exc.url, "headers": _safe_headers(exc.headers)}, len(body), hashlib.sha256(body).hexdigest()
    with response, os.fdopen(os.dup(fd), "wb") as out:
        # A HEAD (or a redirect handed back) has no body to read, whatever its Content-Length says.
        bodiless = response.status in (301, 302, 303, 307, 308) or getattr(response, "method", "GET") == "HEAD"
        size, digest = (0, hashlib.sha256().hexdigest()) if bodiless else _http.stream_to_file(response, out, max_bytes=MAX_GET_BYTES)
        return {"status": response.status, "url": response.geturl(), "headers": _safe_headers(response.headers)}, size, digest


def _download_to(url: str, path: Path, hash_prefix: str | None, progress: bool, open_url: Any) -> None:
    from .. import _download

    # unless_present: parallel calls (threads, processes) fetching one checkpoint download it once.
    _download.fetch_to(url, path, hash_prefix, progress, open_url=open_url, unless_present=True)


def _digest(path: Path, *, trust_memo: bool = True) -> tuple[int, str]:
    """(size, sha256) of a cached file; remembered beside the cache, so a 1 GiB checkpoint is
    hashed once, not on every load (a changed size, mtime or inode means a new file)."""
    import json

    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        memo = _cache.hub_path() / ".safehub" / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(memo.read_text()) if trust_memo else {}
            if known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
                return st.st_size, known["sha256"]
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
        os.replace(tmp, memo)
    return st.st_size, digest


def _torch_home() -> Path:
    """torch.hub's ``_get_torch_home()``, read now (NVIDIA's entrypoints keep files there)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", default)))


def _patterns(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 256 or not all(isinstance(p, str) and len(p) <= 1024 for p in items):
        raise Refusal("allow_patterns and ignore_patterns are a str or a list of str")
    return items


def _safe_headers(headers: Any) -> dict[str, str]:
    keep = ("content-type", "content-length", "etag", "last-modified", "content-disposition", "location",
            "x-repo-commit", "x-linked-etag", "x-linked-size", "x-error-code", "x-error-message")
    return {k: str(v)[:1000] for k, v in headers.items() if k.lower() in keep}
