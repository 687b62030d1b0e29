"""The exceptions safehub raises, and nothing else.

Every error is a :class:`SafeHubError`. Where a torch.hub caller already catches a builtin
(torch 2.13's hub raises ``ValueError``, ``RuntimeError``, ``FileNotFoundError`` for a missing
hubconf.py, and urllib's ``HTTPError``/``URLError``, which are ``OSError``, when GitHub or a
download fails), the safehub error subclasses that builtin too, so code written for torch.hub
keeps working; ``tests/integration/test_error_compat.py`` runs both on the same bad inputs.
Facts are attributes, never parsed from the message.

    SafeHubError
    ├── InvalidRefError (ValueError)          owner/repo[:ref] is not a valid GitHub name
    ├── InvalidArgumentError (ValueError)     any other bad argument (source, returns, ...)
    ├── GitHubError (RuntimeError, OSError)   the GitHub API or archive host failed
    │   ├── RateLimitError                    403/429 with the rate limit spent
    │   ├── AuthenticationError               401: a bad or expired GITHUB_TOKEN
    │   ├── RepoNotFoundError                 404 on the repository
    │   ├── RefNotFoundError (ValueError)     no such branch, tag or commit
    │   ├── ForkCommitError (ValueError)      a commit no branch or tag of the repository holds
    │   └── NetworkError                      the host could not be reached
    ├── OfflineError (RuntimeError)           SAFEHUB_OFFLINE=1 and the cache lacks something
    ├── DiskFullError (OSError)               no space left in a folder safehub writes; path
    ├── DownloadError (RuntimeError, OSError) a download failed
    │   ├── IncompleteDownloadError           fewer bytes than Content-Length said
    │   ├── HashMismatchError                 the sha256 does not match
    │   ├── FetchRefusedError                 the fetch policy refused a URL, address or cap
    │   └── HubFileError                      the Hugging Face Hub (or its cache, offline) lacks a file; kind
    ├── ArchiveError (ValueError)             a corrupt or hostile zip archive
    ├── LockFileError (ValueError)            a lock file is unreadable or lacks an entry
    ├── TreeChangedError (RuntimeError)       a pinned tree in the cache is not the pinned one
    ├── ReadOnlyCacheError (RuntimeError)     something must be written in a read-only hub dir
    ├── UntrustedRepoError (RuntimeError)     trust was needed and not given
    ├── HubconfError (RuntimeError)           hubconf.py is missing or broken
    │   ├── HubconfNotFoundError (FileNotFoundError)  no hubconf.py (or no folder) there
    │   ├── DamagedCacheError                 the cached tree changed since it was fetched; path, repo
    │   ├── MissingDependenciesError          `dependencies` names modules that are not installed
    │   └── EntrypointNotFoundError           no callable of that name
    ├── WorkerError (RuntimeError)            the isolated worker failed
    │   ├── RemoteError                       the repository's code raised; remote_traceback
    │   ├── WorkerCrashedError                the worker died; exit_code, signal_name
    │   ├── WorkerTimeoutError (TimeoutError) the worker ran past Sandbox.timeout
    │   ├── RemoteClosedError                 a remote model's worker has ended; reason
    │   ├── SandboxLimitError                 a limit of the sandbox made it fail; limit, value
    │   └── ProtocolError                     the worker sent bytes that break the protocol
    │       └── ResultDecodeError             a result that fails validation (weights, pickle)
    └── SandboxError (RuntimeError)           a Sandbox setting is invalid or unavailable
"""

from __future__ import annotations

from typing import Any

from ._terminal import WORKER_PREFIX, visible, visible_lines


class SafeHubError(Exception):
    """Root of every error safehub raises.

    Keyword arguments become attributes, and the error pickles with them, so an error raised in
    a worker or a pool process arrives whole.

    The message is one line, its control characters made visible as it is set (``_terminal``):
    it may carry the worker's text (its exception's class and message, a fetched URL), and
    whoever prints it, an uncaught exception's report included, must not hand a terminal an
    escape sequence, nor a line that passes for safehub's own. Facts stay as they came (data).
    """

    def __init__(self, message: str = "", **facts: Any) -> None:
        # Each class declares its facts as annotated class attributes (default None), so a type
        # checker sees ``exc.repo`` and a fact nobody passed reads as None, not AttributeError.
        message = visible(" ".join(message.splitlines()))
        super().__init__(message)
        self.message = message
        self._facts = facts
        for name, value in facts.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._facts))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[SafeHubError], message: str, facts: dict[str, Any]) -> SafeHubError:
    return cls(message, **facts)


class InvalidRefError(SafeHubError, ValueError):
    """The ``owner/repo[:ref]`` string breaks GitHub's naming rules. Attribute: ``value``."""

    value: str | None = None


class InvalidArgumentError(SafeHubError, ValueError):
    """An argument other than the repository string is invalid."""


class GitHubError(SafeHubError, RuntimeError, OSError):
    """GitHub (or the configured mirror) failed. Attributes: ``url``, ``status``."""

    url: str | None = None
    status: int | None = None


class RateLimitError(GitHubError):
    """The API rate limit is spent. Attribute: ``reset_at`` (epoch seconds or None)."""

    reset_at: float | None = None


class AuthenticationError(GitHubError):
    """The API refused the credentials in ``GITHUB_TOKEN``."""


class RepoNotFoundError(GitHubError):
    """The repository does not exist, or is private and no token grants access."""


class RefNotFoundError(GitHubError, ValueError):
    """No branch, tag or commit of that name. Attributes: ``repo``, ``ref``."""

    repo: str | None = None
    ref: str | None = None


class ForkCommitError(GitHubError, ValueError):
    """The commit exists only in a fork. Attributes: ``repo``, ``ref``."""

    repo: str | None = None
    ref: str | None = None


class NetworkError(GitHubError):
    """The host could not be reached (DNS, refused, timed out, cut off)."""


class OfflineError(SafeHubError, RuntimeError):
    """Offline mode is on and the cache cannot answer."""


class DiskFullError(SafeHubError, OSError):
    """A write failed for lack of space (ENOSPC, EDQUOT). Attribute: ``path``, the folder."""

    path: str | None = None


class DownloadError(SafeHubError, RuntimeError, OSError):
    """A download failed. Attribute: ``url``."""

    url: str | None = None


class IncompleteDownloadError(DownloadError):
    """The body ended before Content-Length. Attributes: ``expected``, ``received``."""

    expected: int | None = None
    received: int | None = None


class HashMismatchError(DownloadError):
    """The file's sha256 does not match. Attributes: ``expected``, ``actual``."""

    expected: str | None = None
    actual: str | None = None


class FetchRefusedError(DownloadError):
    """The parent refused a fetch made for a worker (DESIGN 4b). Attributes: ``url``, ``reason``.

    ``reason`` is one of ``"disabled"`` (``Sandbox(fetch=False)``), ``"url"`` (malformed, too long,
    odd characters, credentials in it), ``"scheme"``, ``"host"`` (a ``localhost`` name),
    ``"address"`` (the host resolves to a loopback, private or otherwise non-public address),
    ``"resolve"`` (no address), ``"redirect"`` (too many, or https to http), ``"file_size"``,
    ``"call_bytes"``, ``"fetch_count"``, ``"deadline"`` or ``"response"`` (a malformed answer).
    """

    reason: str | None = None


class HubFileError(DownloadError):
    """A Hugging Face Hub file or snapshot could not be served.

    ``kind`` says why, as huggingface_hub's own errors would: ``entry_not_found``,
    ``revision_not_found``, ``repository_not_found``, ``gated``, ``local_entry_not_found``
    (offline, or ``local_files_only``, and not in the cache), ``integrity`` (bytes that are not
    the ones named) or ``http`` (another answer). Also ``repo_id`` and ``filename``.
    """

    kind: str | None = None
    repo_id: str | None = None
    filename: str | None = None


class ArchiveError(SafeHubError, ValueError):
    """A zip archive is corrupt, too large, or tries to escape its folder."""


class LockFileError(SafeHubError, ValueError):
    """A lock file is unreadable, or has no entry for a repository. Attributes: ``path``, ``repo``."""

    path: str | None = None
    repo: str | None = None


class TreeChangedError(SafeHubError, RuntimeError):
    """A cached tree differs from the tree its lock file pins, and it could not be fetched again
    (offline, or a read-only hub dir). Nothing of it ran. Attributes: ``repo``, ``path``,
    ``changes`` (``+ path``, ``- path``, ``~ path``, as far as the install's manifest tells)."""

    repo: str | None = None
    path: str | None = None
    changes: list[str] | None = None


class ReadOnlyCacheError(SafeHubError, RuntimeError):
    """A download or install must write in a hub dir this process cannot write (a read-only mount,
    or another user's). Attribute: ``hub_dir``."""

    hub_dir: str | None = None


class UntrustedRepoError(SafeHubError, RuntimeError):
    """The repository's code would run outside a sandbox and it is not trusted. Attribute: ``repo``."""

    repo: str | None = None


class HubconfError(SafeHubError, RuntimeError):
    """``hubconf.py`` is missing or fails."""


class HubconfNotFoundError(HubconfError, FileNotFoundError):
    """No ``hubconf.py`` in the folder, or no such folder: torch.hub raises FileNotFoundError there.
    Attribute: ``repo_dir``."""

    repo_dir: str | None = None


class DamagedCacheError(HubconfError):
    """The cached tree of a repository changed since it was fetched (a file edited, added or
    removed), and loading it failed. Attributes: ``path`` (the tree), ``repo``."""

    path: str | None = None
    repo: str | None = None


class MissingDependenciesError(HubconfError):
    """Modules named in ``dependencies`` are not installed. Attribute: ``missing``."""

    missing: list[str] | None = None


class EntrypointNotFoundError(HubconfError):
    """No callable entrypoint of that name. Attributes: ``model``, ``suggestions`` (close names)."""

    model: str | None = None
    suggestions: list[str] | None = None


class WorkerError(SafeHubError, RuntimeError):
    """The isolated worker failed."""


class RemoteError(WorkerError):
    """The repository's code raised. Attributes: ``remote_type``, ``remote_traceback``.

    Its text shows the worker's traceback below the message, each line marked as the worker's
    output is (``[worker] ``), so no line of it can pass for one of safehub's."""

    remote_type: str | None = None
    remote_traceback: str = ""

    def __str__(self) -> str:
        tb = getattr(self, "remote_traceback", "")
        if not tb:
            return self.message
        return f"{self.message}\n\nRemote traceback (from the worker):\n{visible_lines(tb.rstrip(chr(10)), WORKER_PREFIX)}"


class WorkerCrashedError(WorkerError):
    """The worker died before answering. Attributes: ``exit_code``, ``signal_name``."""

    exit_code: int | None = None
    signal_name: str | None = None


class WorkerTimeoutError(WorkerError, TimeoutError):
    """The worker ran past its time limit. Attribute: ``timeout``."""

    timeout: float | None = None


class RemoteClosedError(WorkerError):
    """A remote model (``returns="remote"``) was called after its worker ended: closed, timed
    out, crashed, broke the protocol, or past its idle or whole-life limit. Attribute: ``reason``."""

    reason: str | None = None


class SandboxLimitError(WorkerError):
    """A limit of the sandbox, not the repository, made the worker fail (memory, processes, open
    files, scratch, file size, CPU time). Attributes: ``limit`` (the Sandbox setting's name),
    ``value`` (its value), and where the worker saw it ``remote_type`` and ``remote_traceback``."""

    limit: str | None = None
    value: float | None = None
    remote_type: str | None = None
    remote_traceback: str = ""
    exit_code: int | None = None
    signal_name: str | None = None

    def __str__(self) -> str:
        tb = getattr(self, "remote_traceback", "")
        return f"{self.message}\n\nRemote traceback (from the worker):\n{tb}" if tb else self.message


class ProtocolError(WorkerError):
    """The worker's reply breaks the protocol; nothing of it was executed."""


class ResultDecodeError(ProtocolError):
    """The result failed validation (weights header, dtype, offsets, sizes)."""


class SandboxError(SafeHubError, RuntimeError):
    """A sandbox setting is invalid, or a required layer is unavailable. Attribute: ``layer``."""

    layer: str | None = None
