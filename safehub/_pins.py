"""Pin files (``safehub lock``'s output, read by ``lock=`` and ``--locked``): each repository ref
pinned to a commit SHA, the sha256 of its archive and the digest of its extracted tree.

Like pip's hash-checking mode: with a lock, a load downloads exactly the pinned commit, needs no
API request, and refuses an archive whose sha256 differs. The file is JSON::

    {"version": 1,
     "repos": {"owner/repo:ref": {"ref": "main", "commit_sha": "…40 hex…",
                                  "archive_sha256": "…64 hex…", "tree_sha256": "…64 hex…"}},
     "files": {"https://host/path/w.pth": {"sha256": "…64 hex…", "size": 102400,
                                           "name": "w.pth", "place": "hub/checkpoints"}},
     "hub_files": [{"repo_type": "model", "repo_id": "org/name", "revision": "main",
                    "commit_sha": "…40 hex…", "filename": "model.safetensors",
                    "sha256": "…64 hex…", "size": 102400}]}

Keys are the repository strings as the user wrote them (``owner/repo`` for the default branch);
``ref`` is what the key resolved to, which names the cache folder. ``files`` (optional) pins what
an isolated load fetched through the broker (``safehub lock --load``): with a lock, the broker
serves only those URLs, each checked against its sha256 before the worker sees it. Nested
repositories are pinned in ``repos`` like any other. ``hub_files`` (optional) pins what it fetched
from the Hugging Face Hub: each file of a repository at a revision, the commit that revision
resolved to and the file's sha256; a locked load fetches that commit and refuses other bytes.

``tree_sha256`` (:mod:`safehub._tree`'s digest) pins what runs: every locked operation checks the
cached tree against it before any code of the repository runs. A lock file written before it
existed has none; then the tree is checked against the digest recorded when its archive (whose
sha256 the pin names) was extracted. A file's ``name`` and ``place`` say where it was kept
(``safehub cache fill`` puts it there); older lock files lack them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._refs import RepoRef, ResolvedRef, parse
from .errors import LockFileError

if TYPE_CHECKING:
    from ._cache import CacheEntry

LOCK_VERSION = 1
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A plain file name (the broker's rule): never a path, a hidden or a lock file.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,254}")


@dataclass(frozen=True)
class Pin:
    ref: str
    commit_sha: str
    archive_sha256: str
    tree_sha256: str = ""  # "" in lock files written before tree pins

    def resolved(self, repo_ref: RepoRef) -> ResolvedRef:
        """What ``repo_ref`` resolves to under this pin, with no API request."""
        return ResolvedRef(owner=repo_ref.owner, repo=repo_ref.repo, ref=self.ref, commit_sha=self.commit_sha,
                           kind="locked", is_default_branch=repo_ref.ref is None)

    def holds(self, entry: CacheEntry) -> bool:
        """Whether a cache entry is exactly the pinned commit and archive."""
        return (entry.commit_sha, entry.archive_sha256) == (self.commit_sha, self.archive_sha256)


@dataclass(frozen=True)
class FilePin:
    sha256: str
    size: int
    name: str = ""  # the file name it was kept under ("" in older lock files)
    place: str = ""  # "hub/checkpoints" or "checkpoints" ("" in older lock files)


@dataclass(frozen=True)
class HubPin:
    repo_type: str
    repo_id: str
    revision: str
    commit_sha: str
    filename: str
    sha256: str
    size: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.repo_type, self.repo_id, self.revision, self.filename)


def _key(repo_ref: RepoRef) -> str:
    return str(repo_ref)


def read(path: str | os.PathLike[str]) -> dict[str, Pin]:
    """Read and check a lock file; every entry must be well formed."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LockFileError(f"Lock file {path} does not exist. Make one with `safehub lock REPO... > {path}`.",
                            path=str(path), repo=None) from None
    except (OSError, ValueError) as exc:
        raise LockFileError(f"Cannot read lock file {path}: {exc}", path=str(path), repo=None) from None
    if not isinstance(data, dict) or data.get("version") != LOCK_VERSION or not isinstance(data.get("repos"), dict):
        raise LockFileError(f"{path} is not a safehub lock file of version {LOCK_VERSION}.", path=str(path), repo=None)
    pins: dict[str, Pin] = {}
    for key, value in data["repos"].items():
        try:
            repo_ref = parse(key)
            pin = Pin(**value)
        except (TypeError, ValueError) as exc:
            raise LockFileError(f"Bad entry {key!r} in {path}: {exc}", path=str(path), repo=key) from None
        bad_ref = repo_ref.ref is not None and repo_ref.ref != pin.ref
        bad_tree = pin.tree_sha256 != "" and not _SHA256.fullmatch(str(pin.tree_sha256))
        if bad_ref or bad_tree or not _SHA1.fullmatch(str(pin.commit_sha)) or not _SHA256.fullmatch(str(pin.archive_sha256)):
            raise LockFileError(f"Bad entry {key!r} in {path}: wrong ref or hashes.", path=str(path), repo=key)
        pins[_key(repo_ref)] = pin
    return pins


def read_files(path: str | os.PathLike[str]) -> dict[str, FilePin]:
    """The fetched files a lock file pins (``files``), URL -> FilePin; {} when it pins none."""
    read(path)  # the same checks of the whole file first
    data = json.loads(Path(path).read_text())
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise LockFileError(f"{path}: 'files' is not an object.", path=str(path), repo=None)
    out: dict[str, FilePin] = {}
    for url, value in files.items():
        try:
            pin = FilePin(**value)
        except TypeError as exc:
            raise LockFileError(f"Bad file entry {url[:200]!r} in {path}: {exc}", path=str(path), repo=None) from None
        bad_name = pin.name != "" and (not isinstance(pin.name, str) or not _FILE_NAME.fullmatch(pin.name))
        bad_place = pin.place not in ("", "hub/checkpoints", "checkpoints")
        if not _SHA256.fullmatch(str(pin.sha256)) or type(pin.size) is not int or pin.size < 0 or bad_name or bad_place:
            raise LockFileError(f"Bad file entry {url[:200]!r} in {path}: wrong sha256 or size.", path=str(path), repo=None)
        out[url] = pin
    return out


def read_hub(path: str | os.PathLike[str]) -> dict[tuple[str, str, str, str], HubPin]:
    """The Hugging Face Hub files a lock file pins (``hub_files``), keyed by HubPin.key; {} when none."""
    read(path)
    entries = json.loads(Path(path).read_text()).get("hub_files", [])
    if not isinstance(entries, list):
        raise LockFileError(f"{path}: 'hub_files' is not a list.", path=str(path), repo=None)
    out: dict[tuple[str, str, str, str], HubPin] = {}
    for value in entries:
        try:
            pin = HubPin(**value)
        except TypeError as exc:
            raise LockFileError(f"Bad Hub file entry {str(value)[:200]} in {path}: {exc}", path=str(path), repo=None) from None
        good = (all(isinstance(getattr(pin, f), str) and getattr(pin, f) for f in ("repo_type", "repo_id", "revision", "filename"))
                and _SHA1.fullmatch(str(pin.commit_sha)) and _SHA256.fullmatch(str(pin.sha256)) and type(pin.size) is int and pin.size >= 0)
        if not good:
            raise LockFileError(f"Bad Hub file entry {str(value)[:200]} in {path}: wrong names, commit, sha256 or size.",
                                path=str(path), repo=pin.repo_id if isinstance(pin.repo_id, str) else None)
        out[pin.key] = pin
    return out


def dumps(pins: dict[str, Pin], files: dict[str, FilePin] | None = None, hub_files: list[HubPin] | None = None) -> str:
    data: dict[str, object] = {"version": LOCK_VERSION, "repos": {k: _without_empty(asdict(v)) for k, v in sorted(pins.items())}}
    if files:
        data["files"] = {url: _without_empty(asdict(pin)) for url, pin in sorted(files.items())}
    if hub_files:
        data["hub_files"] = [asdict(pin) for pin in sorted({p.key: p for p in hub_files}.values(), key=lambda p: p.key)]
    return json.dumps(data, indent=2) + "\n"


def default_file_name(url: str) -> str:
    """The name torch.hub keeps a URL's file under (the last part of its path); "" if that is no plain name."""
    import posixpath
    import urllib.parse

    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    return name if _FILE_NAME.fullmatch(name) else ""


def _without_empty(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v != ""}


def pin_for(path: str | os.PathLike[str], repo_ref: RepoRef) -> Pin:
    """The pin of ``repo_ref`` in the lock file at ``path``, or LockFileError naming the fix."""
    pins = read(path)
    try:
        return pins[_key(repo_ref)]
    except KeyError:
        raise LockFileError(
            f"{path} has no entry for {repo_ref}. Add it with `safehub lock {repo_ref}` (and merge "
            "the output into the lock file), or load without lock=.",
            path=str(path),
            repo=str(repo_ref),
        ) from None
