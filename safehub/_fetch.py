"""The fetch step: a resolved repository into the cache.

Under the cache folder's file lock: download the zipball into a private work folder (with
torch.hub's "Downloading" line and a progress bar), check its sha256 against the pin when a lock
file is used, extract it with :mod:`safehub._extract` (no escapes, caps), and install it with
:mod:`safehub._cache` (one rename, the record last). Of many processes that miss the cache at
once, the first downloads and the others find its install once they hold the lock.

The archive is fetched by commit SHA, except with ``skip_validation`` (no API request, as
torch.hub): then by ref, and the commit is the one ``git archive`` wrote into the zip comment
(GitHub's zipballs carry it). An archive with no SHA there is installed with an unknown commit
(:data:`safehub._cache.UNKNOWN_COMMIT`) and a warning, since torch.hub would load it too.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import _cache, _extract, _github, _log
from ._cache import CacheEntry
from ._pins import Pin
from ._refs import RepoRef, ResolvedRef
from .errors import HashMismatchError


def cached(repo_ref: RepoRef, pin: Pin | None = None) -> CacheEntry | None:
    """The cache entry serving ``repo_ref``, with no network; None on a miss or if it is not the pinned one."""
    entry = _cache.lookup(repo_ref)
    if entry is None or (pin is not None and not pin.holds(entry)):
        return None
    return entry


def fetch_repo(resolved: ResolvedRef, *, force_reload: bool = False, verbose: bool = True,
               pin: Pin | None = None) -> CacheEntry:
    """Download, check, extract and install ``resolved``; return its cache entry.

    Unless ``force_reload``, an install of the same folder that another process finished while
    this one waited for the lock is returned instead (if it is the pinned one, with ``pin``).

    Raises:
        HashMismatchError: with ``pin``, the archive's sha256 is not the pinned one; nothing changed.
        GitHubError, NetworkError, DownloadError: the download failed; nothing changed.
        ArchiveError: the archive is corrupt, too large or tries to escape; nothing changed.
    """
    folder = _cache.folder_name(resolved.owner, resolved.repo, resolved.ref)
    with _cache.locked(folder):
        if not force_reload:
            entry = _installed(resolved, pin)
            if entry is not None:
                return entry
        with _cache.work_dir(folder) as work_dir:
            archive_path = work_dir / "archive.zip"
            archive_sha256 = _download(resolved, archive_path, verbose=verbose)
            if pin is not None:
                _check_pin(resolved, pin, archive_sha256)
            extract_dir = work_dir / "extract"
            extract_dir.mkdir()
            tree_dir = _extract.extract_zip(archive_path, extract_dir)
            if resolved.commit_sha is None:
                resolved = replace(resolved, commit_sha=_commit_named_by(archive_path, resolved))
            return _cache.install(resolved, tree_dir, archive_sha256=archive_sha256)


def _installed(resolved: ResolvedRef, pin: Pin | None) -> CacheEntry | None:
    """The record already in ``resolved``'s folder, if it serves the same request."""
    entry = _cache.read_record(_cache.folder_name(resolved.owner, resolved.repo, resolved.ref))
    if entry is None or not entry.matches(RepoRef(resolved.owner, resolved.repo, resolved.ref)):
        return None
    if resolved.is_default_branch and not entry.is_default_branch:
        return None  # a later default-branch lookup would not find it: record it as the default
    if pin is not None and not pin.holds(entry):
        return None
    return entry


def _download(resolved: ResolvedRef, archive_path: Path, *, verbose: bool) -> str:
    """The zipball of ``resolved`` into ``archive_path`` (flushed to disk); return its sha256."""
    where = resolved.commit_sha or resolved.ref
    validated = resolved.commit_sha is not None  # only then may the token go (to the API host)
    url = _github.archive_url(resolved.owner, resolved.repo, where, validated=validated)
    # torch.hub prints this line whatever `verbose` says; only the bar follows `verbose`.
    _log.info(f'Downloading: "{url}" to {_cache.get_dir()}')
    with open(archive_path, "xb") as out, _log.progress(_label(resolved), verbose=verbose) as on_chunk:
        _, sha256 = _github.download_archive(resolved.owner, resolved.repo, where, out, on_chunk=on_chunk,
                                             validated=validated)
        out.flush()
        os.fsync(out.fileno())
    return sha256


def _commit_named_by(archive_path: Path, resolved: ResolvedRef) -> str | None:
    """With skip_validation the API told no commit: the archive's zip comment does, as git archive writes it."""
    commit_sha = _extract.commit_in_comment(archive_path)
    if commit_sha is None:
        # Refusing would fail loads torch.hub makes (a mirror that rewrites archives); the record
        # says the commit is unknown instead, and `safehub lock` refuses to pin it.
        _log.warning(
            f"The archive of {_label(resolved)} names no commit (its zip comment holds no SHA); it is "
            "cached with an unknown commit. Load it without skip_validation to record one."
        )
    return commit_sha


def _check_pin(resolved: ResolvedRef, pin: Pin, archive_sha256: str) -> None:
    if archive_sha256 != pin.archive_sha256:
        raise HashMismatchError(
            f"The archive of {_label(resolved)} at {pin.commit_sha[:12]} has sha256 {archive_sha256}, "
            f"but the lock file pins {pin.archive_sha256}. It was not installed. If the change is "
            "expected, run `safehub lock` again; otherwise treat it as tampering.",
            url=_github.archive_url(resolved.owner, resolved.repo, pin.commit_sha),
            expected=pin.archive_sha256,
            actual=archive_sha256,
        )


def _label(resolved: ResolvedRef) -> str:
    return f"{resolved.owner}/{resolved.repo}:{resolved.ref}"
