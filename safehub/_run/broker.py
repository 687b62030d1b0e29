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
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import _cache, _disk, _egress, _log, constants
from .._sandbox import Sandbox
from ..errors import DiskFullError, OfflineError
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


# Failures that are the caller's, not the repository's: they end the call as they are, rather than
# reaching the worker as a refused fetch whose error the repository would then raise as its own.
CALLERS_ERRORS: tuple[type[BaseException], ...] = (OfflineError, DiskFullError)

NestedRepo = Callable[[dict[str, Any]], Any]  # args -> the repository's cache entry (_cache.CacheEntry)


class Broker:
    """What one call's worker may fetch, and the view it sees the results in."""

    def __init__(self, sandbox: Sandbox, *, nested: NestedRepo | None = None, file_pins: dict[str, Any] | None = None) -> None:
        self.sandbox = sandbox
        self.nested = nested
        # With a lock file: URL -> _pins.FilePin; only those are served, each hash checked first.
        self.file_pins = file_pins
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

    def open_url(self, url: str) -> Any:
        """A response for ``url`` under the call's policy (addresses checked and pinned, caps)."""
        return _egress.open_checked(url, policy=self.policy, budget=self.budget, deadline=self.deadline)

    def handlers(self) -> dict[str, AskHandler]:
        return {"fetch": self.fetch, "get": self.get, "repo": self.repo}

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
        if cached:
            _log.info(f'Using the cached file {path} for "{url[:500]}"')
        else:
            self._may_download(url)
            _log.info(f'Downloading: "{url[:500]}" to {path}')
            # A pinned file is checked against its whole sha256 before it is moved into place.
            with _told_to_the_worker(), _disk.writing_in(folder, f"the file {name} fetched for the worker"):
                _download_to(url, path, pinned.sha256 if pinned else hash_prefix, bool(progress), self.open_url)
        size, digest = _digest(path)
        self._record(BrokeredFetch("file", url, url, size, digest, cached, str(path)))
        return {"path": str(self.view.add_file(path, place, name))}, [], []

    def get(self, args: dict[str, Any]) -> tuple[Any, list[bytes], list[int]]:
        url = self._url(args)
        pinned = self._pinned(url)
        self._may_download(url)
        fd = os.memfd_create("safehub-get", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with _told_to_the_worker():
                value, size, digest = _get_into(url, fd, self.open_url)
            if pinned is not None and digest != pinned.sha256:
                raise Refusal(f"the body of {url[:500]} is not what the lock file pins (sha256 {digest[:16]}..., "
                              f"pinned {pinned.sha256[:16]}...); run `safehub lock --load` again if the change is expected")
            # Sealed: the worker reads the body and can change nothing the parent keeps.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._record(BrokeredFetch("get", url, value["url"], size, digest, False))
        return value, [], [fd]

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
        except CALLERS_ERRORS:
            raise
        except SafeHubError as exc:
            raise Refusal(f"the nested repository {github[:200]} cannot be loaded: {exc}") from None
        self._record(BrokeredFetch("repo", github, github, 0, entry.archive_sha256, True, str(entry.repo_dir), entry.commit_sha))
        return {"path": str(self.view.add_tree(entry.repo_dir, entry.repo_dir.name))}, [], []

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
            # The caller's setting, not the repository's failure: the call ends with it (exit 4).
            raise OfflineError(f"Offline mode (SAFEHUB_OFFLINE=1) is on and {url[:500]}, which the repository "
                               f"fetches, is not in the cache ({_cache.hub_path() / 'checkpoints'}). Load it once "
                               "online, or unset SAFEHUB_OFFLINE.", url=url[:500])

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
    except CALLERS_ERRORS:
        raise
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
        size, digest = _http.stream_to_file(response, out, max_bytes=MAX_GET_BYTES)
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


def _safe_headers(headers: Any) -> dict[str, str]:
    keep = ("content-type", "content-length", "etag", "last-modified", "content-disposition")
    return {k: str(v)[:1000] for k, v in headers.items() if k.lower() in keep}
