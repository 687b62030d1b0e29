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
- ``get`` {url, method}: a plain GET's body (urllib, requests, httpx), at most
  ``Limits.max_get_bytes``, in a sealed memfd; or a HEAD's status and headers, its redirect
  handed back for the worker's client to follow (each hop another ask, each checked).
- ``hf_file`` {repo_id, filename, subfolder, repo_type, revision, endpoint, local_files_only,
  force_download} and ``hf_snapshot`` {repo_id, repo_type, revision, allow_patterns,
  ignore_patterns, ...}: the Hugging Face Hub's ``hf_hub_download`` and ``snapshot_download``,
  fetched into the user's Hugging Face cache in huggingface_hub's layout (``hf.py``); the answer
  is the file's (or snapshot folder's) path in the view's ``huggingface/hub``, or, when the Hub or
  the cache lacks it, {error, message} for the worker to raise as huggingface_hub would.
- ``repo`` {github, force_reload, skip_validation, trust_repo, calling_fn}: a nested
  ``torch.hub.load`` / ``list`` / ``help``, through the parent's whole pipeline (``nested``,
  given by ``_api``); the answer is the repository's tree in the view.

The broker is the worker's way out, so it is strict. URLs: http and https only, the policy of
``policy.py`` (no loopback, private, link-local or otherwise non-global address unless allowed)
checked on every address and redirect by the connection (``connection.py``). Names: a plain
file name, never a path, a link or a hidden or lock file. Caps: one :class:`~.limits.Limits` for
the call (fetches, URL length, bytes per GET, per file and per call), one budget counting them.
A fresh file is hashed once, as it arrives. Every fetch is recorded (:class:`~.record.FetchRecord`)
and logged; ``record.recording()`` hands them to a caller (the CLI's --json).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import _cache, _disk, _download, _http, _log
from .._asks import AskHandler, Refusal
from .._sandbox import Sandbox
from ..errors import DiskFullError, OfflineError, SafeHubError
from . import hf as _hf
from . import limits as _limits
from . import record as _record
from .connection import CallBudget, CheckedResponse, Deadline, FetchPolicy, open_checked
from .limits import Limits
from .record import FetchRecord
from .view import CallView

# A file name torch.hub could have made from a URL, and nothing that is a path or a lock.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,254}\Z")

# Failures that are the caller's, not the repository's: they end the call as they are, rather than
# reaching the worker as a refused fetch whose error the repository would then raise as its own.
CALLERS_ERRORS: tuple[type[BaseException], ...] = (OfflineError, DiskFullError)

NestedRepo = Callable[[dict[str, Any]], Any]  # args -> the repository's cache entry (_cache.CacheEntry)


class Broker:
    """What one call's worker may fetch, and the view it sees the results in."""

    def __init__(self, sandbox: Sandbox, *, nested: NestedRepo | None = None, file_pins: dict[str, Any] | None = None,
                 hub_pins: dict[Any, Any] | None = None, limits: Limits | None = None,
                 granted: frozenset[str] = frozenset()) -> None:
        self.sandbox = sandbox
        self.nested = nested
        # With a lock file: URL -> _pins.FilePin; only those are served, each hash checked first.
        self.file_pins = file_pins
        self.hub_pins = hub_pins  # with a lock file: the Hub files it pins (_pins.HubPin by key)
        # One policy, limits, budget and deadline for the whole call: every ask, every connection.
        self.policy = FetchPolicy.for_sandbox(sandbox)
        self.limits = _limits.DEFAULT_LIMITS if limits is None else limits
        self.budget = CallBudget(self.limits)
        self.deadline = Deadline(sandbox.timeout)
        self.view = CallView(granted)
        self.records: list[FetchRecord] = []

    def close(self) -> None:
        if self.records:
            self.view.remove()  # before the restamp: removing a view's links changes their files' ctime
        else:
            from .._run import reaper

            reaper.later(cleanup=self.view.remove)  # nothing was served: after the worker, in the background
        self._restamp(self.records)
        _record.publish(self.records)

    @staticmethod
    def _restamp(records: list[FetchRecord]) -> None:
        """A view's hard link, made and removed, changes its file's ctime, which the digest memo
        keys on: remember the digests this call measured under the stamps this call caused."""
        for record in records:
            if record.kind == "file" and record.path:
                _cache.remember_file_digest(Path(record.path), record.sha256)
            elif record.kind == "hf" and record.path:  # the snapshot's link: the memo keys on its blob
                _cache.remember_file_digest(Path(record.path).resolve(), record.sha256)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open_url(self, url: str, **options: Any) -> CheckedResponse:
        """A response for ``url`` under the call's policy and limits; the ask was counted already.
        ``options`` as ``connection.open_checked`` takes them (method, headers, credentials, follow)."""
        return open_checked(url, policy=self.policy, budget=self.budget, deadline=self.deadline, counted=True, **options)

    def handlers(self) -> dict[str, AskHandler]:
        return {"fetch": self.fetch, "get": self.get, "repo": self.repo, "hf_file": self.hf_file, "hf_snapshot": self.hf_snapshot}

    # -- the handlers --------------------------------------------------------------------------

    def fetch(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        url = self._url(args)
        name, place = args.get("name"), args.get("place", "hub/checkpoints")
        hash_prefix, progress = args.get("hash_prefix"), args.get("progress", True)
        if not isinstance(name, str) or not _NAME.match(name) or _download.is_reserved_name(name):
            raise Refusal(f"the file name {str(name)[:80]!r} is not a plain file name")
        if place not in ("hub/checkpoints", "checkpoints"):
            raise Refusal(f"files are kept in the checkpoints folders, not {str(place)[:40]!r}")
        if hash_prefix is not None and (not isinstance(hash_prefix, str) or not re.fullmatch(r"[0-9a-fA-F]{1,64}", hash_prefix)):
            raise Refusal(f"the hash prefix {str(hash_prefix)[:80]!r} is not hexadecimal")
        # A read-only shared hub dir that holds the file serves it in place; else the writable one.
        path = _cache.find_checkpoint(place, name) or _cache.checkpoint_dir(place) / name
        pinned = self._pinned(url)
        saved = None
        if path.is_file() and not path.is_symlink():
            _log.info(f'Using the cached file {path} for "{url[:500]}"')
        else:
            self._may_download(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            _log.info(f'Downloading: "{url[:500]}" to {path}')
            # A pinned file is checked against its whole sha256 before it is moved into place;
            # unless_present: parallel calls (threads, processes) fetching one checkpoint download it once.
            with _told_to_the_worker(), _disk.writing_in(path.parent, f"the file {name} fetched for the worker"):
                saved = _download.fetch_to(url, path, pinned.sha256 if pinned else hash_prefix, bool(progress),
                                           open_url=self.open_url, unless_present=True)
        if saved is not None:
            _cache.remember_file_digest(path, saved.sha256)  # measured on the way in: the next load reads it
            _cache.record_checkpoint(path, place, url=url, size=saved.size, sha256=saved.sha256)  # for `cache verify`
            record = FetchRecord(kind="file", url=url, final_url=saved.final_url, size=saved.size,
                                 sha256=saved.sha256, path=str(path), name=name, place=place)
        else:
            # A file the cache had. The digest memo is this user's own (a private folder, keyed on
            # size, mtime, inode and ctime), so a pinned file is hashed once, not on every call.
            size, digest = _cache.file_digest(path)
            if pinned is not None and digest != pinned.sha256:
                raise Refusal(f"{path} is not the file the lock file pins for {url[:500]} (sha256 differs); "
                              "remove it to fetch the pinned one, or run `safehub lock --load` again")
            record = FetchRecord(kind="file", url=url, final_url=url, size=size, sha256=digest, cached=True, path=str(path),
                                 name=name, place=place)
        self._record(record)
        shown = self.view.add_file(path, place, name)
        self._restamp([record])
        return {"path": str(shown)}, [], []

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
                value, record = _get_into(url, fd, opener, self.limits.max_get_bytes)
            if pinned is not None and record.sha256 != pinned.sha256:
                raise Refusal(f"the body of {url[:500]} is not what the lock file pins (sha256 {record.sha256[:16]}..., "
                              f"pinned {pinned.sha256[:16]}...); run `safehub lock --load` again if the change is expected")
            # Sealed: the worker reads the body and can change nothing the parent keeps.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        if method == "GET":
            self._record(record)
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
        self._count(str(args.get("github"))[:200])
        github = args.get("github")
        if not isinstance(github, str) or len(github) > 512:
            raise Refusal("a nested load names its repository as owner/repo[:ref]")
        try:
            entry = self.nested(args)
        except CALLERS_ERRORS:
            raise
        except SafeHubError as exc:
            raise Refusal(f"the nested repository {github[:200]} cannot be loaded: {exc}") from None
        self._record(FetchRecord(kind="repo", url=github, final_url=github, size=0, sha256=entry.archive_sha256, cached=True,
                                 path=str(entry.repo_dir), commit_sha=entry.commit_sha))
        return {"path": str(self.view.add_tree(entry.repo_dir, entry.repo_dir.name))}, [], []

    # -- the Hugging Face Hub ------------------------------------------------------------------

    def _hub(self) -> _hf.HubFetcher:
        # Each file of a snapshot counts as one thing fetched, like each ask.
        return _hf.HubFetcher(self.open_url, digest=lambda path, pinned: _cache.file_digest(path, trust_memo=not pinned),
                              count=self._count, pins=self.hub_pins)

    def _hub_request(self, args: dict[str, Any], *, with_file: bool) -> _hf.HubRequest:
        if not self.sandbox.fetch:
            raise Refusal("fetches are switched off for this call (Sandbox(fetch=False))")
        self._count(f"{str(args.get('repo_id'))[:100]} {str(args.get('filename', ''))[:100]}")
        try:
            return _hf.request_from(args, with_file=with_file)
        except ValueError as exc:
            raise Refusal(str(exc)) from None

    def _hub_served(self, fetch: Callable[[], list[_hf.HubServed]]) -> list[_hf.HubServed] | dict[str, Any]:
        """Files fetched and recorded; a file the Hub or the cache lacks is the worker's to raise
        as huggingface_hub would ({error, message}); a refusal or a failed download is refused."""
        from ..errors import HubFileError

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
            self._record(FetchRecord(kind="hf", url=request.resolve_url(), final_url=request.resolve_url(item.commit_sha),
                                     size=item.size, sha256=item.sha256, cached=item.cached, path=str(item.snapshot_path),
                                     commit_sha=item.commit_sha,
                                     hub_file=(request.repo_type, request.repo_id, request.revision, request.filename)))
        return served

    # -- rules ---------------------------------------------------------------------------------

    def _url(self, args: dict[str, Any]) -> str:
        if not self.sandbox.fetch:
            raise Refusal("fetches are switched off for this call (Sandbox(fetch=False))")
        url = args.get("url")
        self._count(url if isinstance(url, str) else repr(url))
        if not isinstance(url, str) or not url or len(url) > self.limits.max_url_chars:
            raise Refusal(f"a URL is a str of at most {self.limits.max_url_chars} characters")
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
        # The caller's setting, not the repository's failure: the call ends with it (exit 4).
        _http.require_online(f"{url[:500]}, which the repository fetches,", url=url[:500],
                             where=f"the cache ({_cache.hub_path() / 'checkpoints'})")

    def _count(self, what: str) -> None:
        """Count one ask against the call's budget, before anything else is decided about it."""
        try:
            self.budget.start_fetch(what)
        except SafeHubError as exc:
            raise Refusal(str(exc)) from None

    def _record(self, record: FetchRecord) -> None:
        self.records.append(record)
        source = "from the cache" if record.cached else f"{record.size} bytes"
        _log.info(f"the worker fetched {record.url[:500]} ({record.kind}, {source}, sha256 {record.sha256[:16] or '-'})")


@contextlib.contextmanager
def _told_to_the_worker() -> Iterator[None]:
    """A failed download (status, hash, cut-off body, unreachable host) is the worker's to handle,
    as torch.hub's errors are: it gets the message as a refusal, and this call goes on."""
    try:
        yield
    except CALLERS_ERRORS:
        raise
    except SafeHubError as exc:
        raise Refusal(str(exc)) from None


def _get_into(url: str, fd: int, open_url: Callable[[str], CheckedResponse], max_bytes: int) -> tuple[dict[str, Any], FetchRecord]:
    """A GET's body into ``fd`` (at most ``max_bytes``): (status, final URL and headers; its record).

    An error status is the worker's to see, as urllib would show it: its body comes along."""
    try:
        response = open_url(url)
    except _http.HTTPStatusError as exc:
        body = exc.body[:max_bytes]
        os.write(fd, body)
        record = FetchRecord(kind="get", url=url, final_url=exc.url, size=len(body), sha256=hashlib.sha256(body).hexdigest())
        return {"status": exc.status, "url": exc.url, "headers": _safe_headers(exc.headers)}, record
    with response, os.fdopen(os.dup(fd), "wb") as out:
        # A HEAD (or a redirect handed back) has no body to read, whatever its Content-Length says.
        if response.status in (301, 302, 303, 307, 308) or response.method == "HEAD":
            value = {"status": response.status, "url": response.geturl(), "headers": _safe_headers(response.headers)}
            return value, FetchRecord(kind="get", url=url, final_url=response.geturl(), size=0, sha256=hashlib.sha256().hexdigest())
        size, digest = _http.stream_to_file(response, out, max_bytes=max_bytes)  # digest: the connection's
        record = FetchRecord(kind="get", url=url, final_url=response.geturl(), size=size, sha256=digest)
        return {"status": response.status, "url": response.geturl(), "headers": _safe_headers(response.headers)}, record


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
