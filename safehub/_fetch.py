"""The fetch step: the cache entry serving a repository, fetched into the cache if need be.

One door, :func:`entry_for`, deciding in this order: the pin (with a lock file, the repository's
entry in it, read here and only here), a cache hit (:func:`cached`, exactly the pinned tree with a
pin), offline (``_http.require_online``, the one offline check), pin or resolve (a pin names the
commit, no API request; otherwise ``_refs.resolve``), then :func:`fetch_repo`.

Under the cache folder's file lock: download the zipball into a private work folder (with
torch.hub's "Downloading" line and a progress bar), check its sha256 against the pin when a lock
file is used, extract it with :mod:`safehub._extract` (no escapes, caps), and install it with
:mod:`safehub._cache` (one rename, the record last). Of many processes that miss the cache at
once, the first downloads and the others find its install once they hold the lock.

With a pin, a cached tree is served only if it still is the pinned tree (:func:`cached`, checked
against the pin's ``tree_sha256``, or the record's digest for a lock file older than tree pins)
before any of its code runs. A changed tree is fetched again and replaced when it can be (online,
a writable hub dir), else refused with :class:`~safehub.errors.TreeChangedError`.

The archive is fetched by commit SHA, except with ``skip_validation`` (no API request, as
torch.hub): then by ref, and the commit is the one ``git archive`` wrote into the zip comment
(GitHub's zipballs carry it). An archive with no SHA there is installed with an unknown commit
(:data:`safehub._cache.UNKNOWN_COMMIT`) and a warning, since torch.hub would load it too.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import _cache, _disk, _extract, _github, _http, _log, _pins, _refs, _tree, constants
from ._cache import CacheEntry
from ._pins import Pin
from ._refs import RepoRef, ResolvedRef
from .errors import HashMismatchError, ReadOnlyCacheError, TreeChangedError


def entry_for(repo_ref: RepoRef, *, force_reload: bool = False, verbose: bool = True, skip_validation: bool = False,
              lock: str | os.PathLike[str] | None = None) -> CacheEntry:
    """The cache entry serving ``repo_ref``, fetched if needed (exactly the pinned one with ``lock``).

    Raises:
        LockFileError: ``lock`` cannot be read or has no entry for the repository.
        OfflineError: offline mode is on and the cache has no entry serving the request.
        TreeChangedError: as :func:`cached`.
        HashMismatchError, ReadOnlyCacheError, GitHubError, NetworkError, DownloadError,
            ArchiveError: as :func:`fetch_repo` and ``_refs.resolve``.
    """
    pin = _pins.pin_for(lock, repo_ref) if lock is not None else None
    if not force_reload:
        entry = cached(repo_ref, pin)
        if entry is not None:
            _log.info(f"Using cache found in {entry.repo_dir}", verbose=verbose)
            return entry
    _http.require_online(str(repo_ref), where=f"the cache ({_cache.get_dir()})")
    # A locked load asks the API nothing: the pin names the commit.
    resolved = pin.resolved(repo_ref) if pin is not None else _refs.resolve(repo_ref, skip_validation=skip_validation)
    return fetch_repo(resolved, force_reload=force_reload, verbose=verbose, pin=pin)


def cached(repo_ref: RepoRef, pin: Pin | None = None) -> CacheEntry | None:
    """The cache entry serving ``repo_ref``, with no network; None on a miss or if it is not the pinned one.

    With ``pin``, the tree on disk is checked against it first (cheap when its files' stamps did
    not change). A changed tree is None (to be fetched again) when it can be replaced, online in
    a writable hub dir, with a warning naming the changes.

    Raises:
        TreeChangedError: the pinned tree changed and cannot be fetched again (offline or a
            read-only hub dir); nothing of it ran.
    """
    if pin is None:
        return _cache.lookup(repo_ref)  # unlocked: torch.hub's behaviour, a cached folder is used as it is
    changed: list[tuple[CacheEntry, list[str]]] = []
    for entry in _cache.lookup_all(repo_ref):  # shared hub dirs first, in order
        if not pin.holds(entry):
            continue
        changes = tree_changes(entry, pin)
        if changes is None:
            return entry
        changed.append((entry, changes))
    if not changed:
        return None
    entry, changes = changed[0]
    shown = _shown(changes)
    if constants.SAFEHUB_OFFLINE or not _cache.hub_is_writable():
        why = ("offline mode is on" if constants.SAFEHUB_OFFLINE else
               f"the hub dir {_cache.get_dir()} is read-only here")
        raise TreeChangedError(
            f"The cached tree of {repo_ref} ({entry.repo_dir}) is not the tree the lock file pins "
            f"({shown}), and {why}, so it cannot be fetched again. None of its code ran. Fetch it "
            f"again online into a writable hub dir (`safehub cache fill --locked LOCKFILE`, or "
            f"`safehub cache clean {entry.owner}/{entry.repo}:{entry.ref}` then load), or rebuild "
            "the image it came from; if nobody should have changed it, treat it as tampering.",
            repo=str(repo_ref),
            path=str(entry.repo_dir),
            changes=changes,
        )
    _log.warning(f"The cached tree of {repo_ref} ({entry.repo_dir}) is not the pinned one ({shown}); "
                 "fetching the pinned archive again. None of the changed code ran.")
    return None


def tree_changes(entry: CacheEntry, pin: Pin) -> list[str] | None:
    """None if ``entry``'s tree on disk is the one ``pin`` pins; else what changed (maybe [] if unknown).

    A pin without ``tree_sha256`` (an older lock file) is held to the digest recorded when the
    pinned archive was extracted.
    """
    if pin.tree_sha256:
        now = _cache.tree_manifest(entry.repo_dir)
        if now.digest == pin.tree_sha256:
            return None
    else:
        if entry.tree_matches():
            return None
        now = _cache.tree_manifest(entry.repo_dir)
    reference = _cache.read_manifest(entry)
    return reference.changes(now) if reference is not None else []


def _shown(changes: list[str], limit: int = 10) -> str:
    if not changes:
        return "its digest differs"
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return "changed: " + ", ".join(changes[:limit]) + more


def fetch_repo(resolved: ResolvedRef, *, force_reload: bool = False, verbose: bool = True,
               pin: Pin | None = None) -> CacheEntry:
    """Download, check, extract and install ``resolved``; return its cache entry.

    Unless ``force_reload``, an install of the same folder that another process finished while
    this one waited for the lock is returned instead (if it is the pinned one, with ``pin``).

    Raises:
        HashMismatchError: with ``pin``, the archive's sha256 is not the pinned one; nothing changed.
        GitHubError, NetworkError, DownloadError: the download failed; nothing changed.
        DiskFullError: the hub dir has no room left; nothing changed.
        ArchiveError: the archive is corrupt, too large or tries to escape; nothing changed.
    """
    folder = _cache.folder_name(resolved.owner, resolved.repo, resolved.ref)
    if not _cache.hub_is_writable():
        raise ReadOnlyCacheError(
            f"{resolved.owner}/{resolved.repo}:{resolved.ref} must be downloaded, but the hub dir "
            f"{_cache.get_dir()} is read-only here (a read-only mount, or another user's). Point "
            "--hub-dir / TORCH_HOME at a writable folder, and list this one in SAFEHUB_SHARED_HUB_DIRS "
            "to keep using what it holds; or fill it where it is writable (`safehub cache fill --locked LOCKFILE`).",
            hub_dir=_cache.get_dir(),
        )
    with _disk.writing_in(_cache.get_dir(), f"the repository {_label(resolved)}"), _cache.locked(folder):
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
            manifest = _tree.of_dir(tree_dir)
            if pin is not None and pin.tree_sha256 and manifest.digest != pin.tree_sha256:
                raise HashMismatchError(
                    f"The archive of {_label(resolved)} has the pinned sha256 but extracts to a tree with "
                    f"digest {manifest.digest}, not the pinned {pin.tree_sha256}. It was not installed. "
                    "The lock file does not hold together: run `safehub lock` again.",
                    url=_github.archive_url(resolved.owner, resolved.repo, pin.commit_sha),
                    expected=pin.tree_sha256,
                    actual=manifest.digest,
                )
            if resolved.commit_sha is None:
                resolved = replace(resolved, commit_sha=_commit_named_by(archive_path, resolved))
            old = _installed_manifest(folder)
            entry = _cache.install(resolved, tree_dir, archive_sha256=archive_sha256, manifest=manifest)
            if pin is not None and old is not None and old.digest != manifest.digest:
                _log.warning(f"Replaced the changed tree of {_label(resolved)} with the pinned one "
                             f"({_shown(manifest.changes(old))} before the replacement).")
            return entry


def _installed_manifest(folder: str) -> _tree.Manifest | None:
    """The manifest of the tree in ``folder`` now, if there is one (to log what a replacement undid)."""
    entry = _cache.read_record(folder)
    return None if entry is None else _cache.tree_manifest(entry.repo_dir)


def _installed(resolved: ResolvedRef, pin: Pin | None) -> CacheEntry | None:
    """The record already in ``resolved``'s folder, if it serves the same request."""
    entry = _cache.read_record(_cache.folder_name(resolved.owner, resolved.repo, resolved.ref))
    if entry is None or not entry.matches(RepoRef(resolved.owner, resolved.repo, resolved.ref)):
        return None
    if resolved.is_default_branch and not entry.is_default_branch:
        return None  # a later default-branch lookup would not find it: record it as the default
    if pin is not None and (not pin.holds(entry) or tree_changes(entry, pin) is not None):
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
