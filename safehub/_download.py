"""torch.hub's ``download_url_to_file`` and ``load_state_dict_from_url``, made careful.

Differences from torch.hub, all deliberate:

- The body goes to a temporary file beside ``dst`` whose name is unique to the process, and is
  renamed into place only after its length (Content-Length) and hash prefix check out. Every
  failure, Ctrl-C included, removes the temporary file and leaves ``dst`` as it was.
- A file lock on ``dst + ".lock"`` (``_filelock.locked``) makes parallel callers (threads and
  processes) download once; the waiters log every few seconds so a stuck lock is visible.
  Names ending in ``.lock`` or ``.partial`` are these helpers' own (:func:`is_reserved_name`).
- ``load_state_dict_from_url`` defaults to ``weights_only=True``, checks ``file_name``, and opens
  the legacy single-file zip format with the same rules as repository archives.
- HTTP failures raise :class:`~safehub.errors.DownloadError` with the status and URL; a hash
  mismatch raises :class:`~safehub.errors.HashMismatchError`. Both are ``RuntimeError``, as in
  torch.hub.
- The "Downloading" line goes to stderr, so stdout stays clean for machine-readable output.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import sys
import urllib.parse
import uuid
import warnings
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _extract, _filelock, _http, _log
from .errors import DownloadError, HashMismatchError, InvalidArgumentError

logger = logging.getLogger("safehub")

# torch.hub's convention: "name-<sha256 prefix>.ext".
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Beside a downloaded file: its lock, and downloads in progress (``<name>.<pid>.<random>.partial``).
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"

_STATUS_ADVICE = {
    401: "the server wants credentials; this URL is not public",
    403: "access is forbidden; check that the URL is public or that you have access",
    404: "check the URL: the file does not exist there",
    410: "the file was removed; check the URL",
    429: "the server is rate limiting; wait and try again",
}


def download_url_to_file(
    url: str,
    dst: str,
    hash_prefix: str | None = None,
    progress: bool = True,
) -> None:
    r"""Download object at the given URL to a local path.

    The object is written to a temporary file beside ``dst`` and moved into place only once it
    is complete (its length matches Content-Length) and its hash matches ``hash_prefix``; on any
    failure ``dst`` is left as it was and the temporary file is removed. A lock on
    ``dst + ".lock"`` keeps parallel callers from downloading the same file at once.

    Args:
        url (str): URL of the object to download
        dst (str): Full path where object will be saved, e.g. ``/tmp/temporary_file``
        hash_prefix (str, optional): If not None, the SHA256 downloaded file should start with ``hash_prefix``.
            Default: None
        progress (bool, optional): whether or not to display a progress bar to stderr
            Default: True

    Raises:
        DownloadError: the server answered with an error status (``status`` and ``url`` are set).
        IncompleteDownloadError: the body ended before its Content-Length.
        HashMismatchError: the SHA256 of the body does not start with ``hash_prefix``
            (``expected`` and ``actual`` are set).
        NetworkError: the host could not be reached.
        FileNotFoundError: the folder of ``dst`` does not exist.

    Example:
        >>> # xdoctest: +SKIP("downloads")
        >>> safehub.download_url_to_file(
        ...     "https://s3.amazonaws.com/pytorch/models/resnet18-5c106cde.pth",
        ...     "/tmp/temporary_file",
        ... )

    """
    fetch_to(url, pathlib.Path(os.path.expanduser(dst)), hash_prefix, progress)


class Saved(NamedTuple):
    """What a download put in place: where the URL led after redirects, its size and sha256."""

    final_url: str
    size: int
    sha256: str


def is_reserved_name(name: str) -> bool:
    """Whether a file name is one of these helpers' own: a lock file or a download in progress."""
    return name.endswith((LOCK_SUFFIX, PARTIAL_SUFFIX))


def fetch_to(url: str, dst: pathlib.Path, hash_prefix: str | None, progress: bool, *,
             open_url: Callable[[str], Any] | None = None, unless_present: bool = False) -> Saved | None:
    """``download_url_to_file`` with the connection chosen by the caller (the fetch broker's
    policy), and with ``unless_present`` a file another process finished meanwhile kept as it
    is: parallel callers then download once. Returns what this call saved (the size and sha256
    measured on the way in), or None when it kept the file that was there."""
    if not dst.parent.is_dir():
        # As torch.hub; filelock would otherwise create the missing folders for the lock file.
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(dst.parent))
    with _filelock.locked(f"{dst}{LOCK_SUFFIX}", str(dst)):
        if unless_present and dst.is_file():
            return None
        return _download(url, dst, hash_prefix, progress, open_url)


def load_state_dict_from_url(
    url: str,
    model_dir: str | None = None,
    map_location: Any = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: str | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    r"""Loads the Torch serialized object at the given URL.

    If downloaded file is a zip file, it will be automatically
    decompressed.

    If the object is already present in `model_dir`, it's deserialized and
    returned.
    The default value of ``model_dir`` is ``<hub_dir>/checkpoints`` where
    ``hub_dir`` is the directory returned by :func:`~safehub.get_dir`.

    Parallel callers (threads or processes) download the file once: the others wait on a lock
    and then read the file the first one saved.

    Args:
        url (str): URL of the object to download
        model_dir (str, optional): directory in which to save the object
        map_location (optional): a function or a dict specifying how to remap storage locations (see torch.load)
        progress (bool, optional): whether or not to display a progress bar to stderr.
            Default: True
        check_hash(bool, optional): If True, the filename part of the URL should follow the naming convention
            ``filename-<sha256>.ext`` where ``<sha256>`` is the first eight or more
            digits of the SHA256 hash of the contents of the file. The hash is used to
            ensure unique names and to verify the contents of the file.
            Default: False
        file_name (str, optional): name for the downloaded file. Filename from ``url`` will be used if not set.
            It must be a plain file name: no folder, not ``.`` or ``..``.
        weights_only(bool, optional): If True, only weights will be loaded and no complex pickled objects.
            Recommended for untrusted sources. See :func:`~torch.load` for more details.
            Default: True (torch.hub defaults to False).

    Returns:
        The deserialized object, usually a state dict.

    Raises:
        InvalidArgumentError: ``file_name`` (or the name taken from the URL) is not a plain file name.
        DownloadError, IncompleteDownloadError, HashMismatchError, NetworkError: as
            :func:`download_url_to_file`.
        ArchiveError: a legacy zip checkpoint is corrupt or holds anything but one plain file.
        pickle.UnpicklingError: with ``weights_only=True``, the file holds objects other than
            tensors and plain containers (raised by :func:`torch.load`).

    Example:
        >>> # xdoctest: +SKIP("downloads")
        >>> state_dict = safehub.load_state_dict_from_url(
        ...     "https://s3.amazonaws.com/pytorch/models/resnet18-5c106cde.pth"
        ... )

    """
    if os.getenv("TORCH_MODEL_ZOO"):
        warnings.warn("TORCH_MODEL_ZOO is deprecated, please use env TORCH_HOME instead", stacklevel=2)

    filename = _checked_file_name(url, file_name)
    model_path = _model_dir(model_dir)
    model_path.mkdir(parents=True, exist_ok=True)
    cached_file = model_path / filename

    with _filelock.locked(f"{cached_file}{LOCK_SUFFIX}", str(cached_file)):
        # Another caller may have finished the download while this one waited for the lock.
        if not cached_file.exists():
            sys.stderr.write(f'Downloading: "{url}" to {cached_file}\n')
            _download(url, cached_file, _hash_prefix(filename, check_hash), progress)
        # Extracted under the lock, as torch.hub rewrites the extracted file on every call.
        load_path = _legacy_zip_extract(cached_file, model_path) if _is_legacy_zip_format(cached_file) else cached_file
    import torch  # here, so `import safehub` (and the CLI) stays quick

    return torch.load(load_path, map_location=map_location, weights_only=weights_only)


# --- arguments ------------------------------------------------------------------------------


def _checked_file_name(url: str, file_name: str | None) -> str:
    if file_name is None:
        name = os.path.basename(urllib.parse.urlparse(url).path)
        where = f"the URL {url!r}"
    else:
        name = file_name
        where = "file_name"
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or _CONTROL_CHARS.search(name):
        # Prevents a checkpoint written outside model_dir (or over it) through a crafted name.
        raise InvalidArgumentError(
            f"{where} gives the file name {name!r}; a plain file name is needed (no '/', no '..', "
            "not empty). Pass file_name='model.pth'.",
            file_name=name,
        )
    if is_reserved_name(name):
        # Prevents a checkpoint colliding with another's lock file (filelock truncates it) or
        # with a download in progress.
        raise InvalidArgumentError(
            f"{where} gives the file name {name!r}; names ending in .lock or .partial are "
            "reserved for safehub's own files. Pass another file_name.",
            file_name=name,
        )
    return name


def _model_dir(model_dir: str | None) -> pathlib.Path:
    if model_dir is not None:
        return pathlib.Path(os.path.expanduser(model_dir))
    from . import _cache  # lazily: _cache imports more than a download needs

    return _cache.checkpoint_dir("hub/checkpoints")


def _hash_prefix(filename: str, check_hash: bool) -> str | None:
    if not check_hash:
        return None
    match = HASH_REGEX.search(filename)
    if not match or not match.group(1):
        # torch.hub skips the check silently here; say so, since the caller asked for one.
        logger.warning("check_hash=True but %r has no '-<sha256 prefix>.' part; the hash is not checked", filename)
        return None
    return match.group(1)


# --- the download itself (the caller holds the lock) ------------------------------------------


def _download(url: str, dst: pathlib.Path, hash_prefix: str | None, progress: bool,
              open_url: Callable[[str], Any] | None = None) -> Saved:
    # Unique to this process and call, so a crashed or parallel download never shares the file.
    tmp_path = dst.with_name(f"{dst.name}.{os.getpid()}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            saved = _fetch_into(url, out, progress, open_url, label=dst.name)
        _check_hash(url, saved.sha256, hash_prefix)
        os.replace(tmp_path, dst)
    except BaseException:
        # Every failure, KeyboardInterrupt included, leaves dst as it was and no temporary file.
        tmp_path.unlink(missing_ok=True)
        raise
    return saved


def _fetch_into(url: str, out: Any, progress: bool, open_url: Callable[[str], Any] | None = None, *,
                label: str = "") -> Saved:
    """Stream ``url`` into ``out``; return the final URL and the body's size and sha256 hex. The
    progress bar, labelled ``label``, is drawn only on a terminal and never with ``-q``
    (``_log.progress``)."""
    try:
        response = (open_url or _http.open_url)(url)
    except _http.HTTPStatusError as exc:
        raise _status_error(exc) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with _log.progress(label or os.path.basename(urllib.parse.urlsplit(url).path), verbose=progress,
                           total=total) as on_chunk:
            size, digest = _http.stream_to_file(response, out, on_chunk=on_chunk)
        return Saved(response.geturl(), size, digest)


def _status_error(exc: _http.HTTPStatusError) -> DownloadError:
    advice = _STATUS_ADVICE.get(exc.status)
    if advice is None:
        advice = "the server failed; try again later" if exc.status >= 500 else "check the URL"
    return DownloadError(
        f"Downloading {exc.url} failed with HTTP {exc.status}: {advice}.",
        url=exc.url,
        status=exc.status,
    )


def _check_hash(url: str, digest: str, hash_prefix: str | None) -> None:
    if hash_prefix is None:
        return
    expected = hash_prefix.lower()  # an uppercase hex prefix means the same hash
    if not digest.startswith(expected):
        raise HashMismatchError(
            f'invalid hash value (expected "{hash_prefix}", got "{digest}") for {url}; '
            "the file was not saved",
            url=url,
            expected=hash_prefix,
            actual=digest,
        )


# --- torch.hub's legacy zip format -------------------------------------------------------------


def _is_legacy_zip_format(path: pathlib.Path) -> bool:
    """A zip with exactly one file: a pre-1.6 ``torch.save`` output zipped by hand."""
    # Modern torch.save files are zips too, but always with several members.
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return False  # torch.load gives the clearer error
    return len(infos) == 1 and not infos[0].is_dir()


def _legacy_zip_extract(path: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    warnings.warn(
        "Falling back to the old format < 1.6. This support will be "
        "deprecated in favor of default zipfile format introduced in 1.6. "
        "Please redo torch.save() to save it in the new zipfile format.",
        FutureWarning,
        stacklevel=3,
    )
    return _extract.extract_single_file(path, model_dir)
