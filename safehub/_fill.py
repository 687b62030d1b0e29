"""Fill a hub dir with exactly what a lock file pins: ``safehub cache fill --locked FILE``.

For a fleet: bake one hub dir (a container image layer, a shared mount) that then serves every
locked call offline and read-only. Each pinned repository (nested ones are pinned like any other)
is fetched as a locked load fetches it (the pinned commit, its archive's sha256 and tree digest
checked) or, if cached, checked against its pin; each pinned file is downloaded under the fetch
broker's policy into the checkpoints folder the lock names, its whole sha256 checked before it
is moved into place, or, if present, hashed and compared. Nothing else is fetched and no code of
any repository runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import _cache, _fetch, _http, _log, _pins, _refs
from .errors import HashMismatchError, LockFileError

# One fill may take long (many large files); each socket operation still has its own timeout.
_FILL_DEADLINE_S = 24 * 3600.0


@dataclass
class FillReport:
    repos: list[dict[str, object]] = field(default_factory=list)
    files: list[dict[str, object]] = field(default_factory=list)


def fill(lock_path: str | os.PathLike[str], *, progress: bool = True) -> FillReport:
    """Fetch (or check) every repository and file ``lock_path`` pins into the hub dir.

    Raises:
        LockFileError: the lock file is unreadable, or a pinned file has no name to keep it under.
        HashMismatchError: a download, or a file already present, is not what the lock pins.
        TreeChangedError: a cached tree changed and cannot be fetched again (offline, read-only).
        ReadOnlyCacheError: something must be downloaded into a read-only hub dir.
    """
    pins = _pins.read(lock_path)
    file_pins = _pins.read_files(lock_path)
    report = FillReport()
    for key, pin in sorted(pins.items()):
        repo_ref = _refs.parse(key)
        entry = _fetch.cached(repo_ref, pin)
        fetched = entry is None
        if entry is None:
            _may_download(key)
            entry = _fetch.fetch_repo(pin.resolved(repo_ref), verbose=progress, pin=pin)
        report.repos.append({"repo": key, "commit_sha": entry.commit_sha, "path": str(entry.repo_dir), "fetched": fetched})
    for url, file_pin in sorted(file_pins.items()):
        report.files.append(_fill_file(lock_path, url, file_pin, progress=progress))
    return report


def _fill_file(lock_path: str | os.PathLike[str], url: str, pin: _pins.FilePin, *, progress: bool) -> dict[str, object]:
    name = pin.name or _pins.default_file_name(url)
    place = pin.place or "hub/checkpoints"
    if not name:
        raise LockFileError(
            f"{lock_path} pins {url[:200]} without a file name, and its URL names none. Run "
            "`safehub lock --load` again to record where it is kept.",
            path=str(lock_path),
            repo=None,
        )
    path = _cache.find_checkpoint(place, name)
    fetched = path is None
    if path is None:
        _may_download(url)
        path = _cache.checkpoint_dir(place) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, path, pin.sha256, progress)
    size, sha256 = _cache.file_digest(path)
    if sha256 != pin.sha256:
        raise HashMismatchError(
            f"{path} is not the file {lock_path} pins for {url[:200]} (sha256 {sha256}, pinned {pin.sha256}). "
            "Remove it and fill again, or run `safehub lock --load` again if the change is expected.",
            url=url,
            expected=pin.sha256,
            actual=sha256,
        )
    if fetched:
        _cache.record_checkpoint(path, place, url=url, size=size, sha256=sha256)
    return {"url": url, "path": str(path), "size": size, "sha256": sha256, "fetched": fetched}


def _download(url: str, path: Path, sha256: str, progress: bool) -> None:
    from . import _download as download
    from ._egress.connection import CallBudget, CheckedResponse, Deadline, FetchPolicy, open_checked
    from ._sandbox import Sandbox

    # The broker's policy: what a worker could have fetched at lock time, and nothing private.
    policy = FetchPolicy.for_sandbox(Sandbox())
    budget, deadline = CallBudget(), Deadline(_FILL_DEADLINE_S)
    _log.info(f'Downloading: "{url}" to {path}')

    def open_url(u: str) -> CheckedResponse:
        return open_checked(u, policy=policy, budget=budget, deadline=deadline)

    saved = download.fetch_to(url, path, sha256, progress, open_url=open_url, unless_present=True)
    if saved is not None:
        _cache.remember_file_digest(path, saved.sha256)  # measured on the way in


def _may_download(what: str) -> None:
    _http.require_online(what[:200], where=f"the cache ({_cache.get_dir()})")
