"""The hub dir: torch.hub's layout, plus locks, metadata and atomic installs.

Repository trees live where torch.hub puts them (``<hub_dir>/<owner>_<repo>_<ref>``), so both
tools share one cache. safehub's own state lives in ``<hub_dir>/.safehub/``:

- ``repos/<folder>.json``: what the tree is (owner, repo, ref, commit SHA, archive sha256). A tree
  without its record is never served: it may be half written, torch.hub's, or another ref's.
- ``locks/<folder>.lock``: one lock per cache folder, so parallel jobs download once.
- ``tmp/``: downloads and extractions in progress, renamed into place when whole.

An install writes the tree first and the record last, and removes the record before touching an
old tree, so a crash at any point leaves either a served tree with a true record, or no record.
Getting a tree to install (download, pin check, extraction) is the fetch step's, in ``_fetch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _filelock, _stale, constants
from ._refs import RepoRef, ResolvedRef
from .errors import SafeHubError

_hub_dir: str | None = None


def get_dir() -> str:
    r"""Get the Torch Hub cache directory used for storing downloaded models & weights.

    If :func:`set_dir` is not called, default path is ``$TORCH_HOME/hub`` where environment
    variable ``$TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``. ``$XDG_CACHE_HOME`` follows
    the X Design Group specification of the Linux filesystem layout, with a default value
    ``~/.cache`` if the environment variable is not set. This is torch.hub's folder: the two
    share one cache.

    Returns:
        str: the hub directory.

    Example:
        >>> safehub.get_dir()  # doctest: +SKIP
        '/home/me/.cache/torch/hub'
    """
    if os.getenv("TORCH_HUB"):
        warnings.warn("TORCH_HUB is deprecated, please use env TORCH_HOME instead", stacklevel=2)
    if _hub_dir is not None:
        return _hub_dir
    return os.path.join(constants.TORCH_HOME, "hub")


def set_dir(d: str | os.PathLike[str]) -> None:
    r"""Optionally set the Torch Hub directory used to save downloaded models & weights.

    Args:
        d (str): path to a local folder to save downloaded models & weights.

    Example:
        >>> safehub.set_dir("/tmp/hub")  # doctest: +SKIP
    """
    global _hub_dir
    _hub_dir = os.path.expanduser(os.fspath(d))


def hub_path() -> Path:
    return Path(get_dir())


def folder_name(owner: str, repo: str, ref: str) -> str:
    """torch.hub's folder name: ``a/b`` and ``a_b`` share one, which the record tells apart."""
    return "_".join([owner, repo, ref.replace("/", "_")])


def _inside(root: Path, name: str) -> Path:
    # Refuse any computed path outside its root, whatever a name holds.
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise SafeHubError(f"Refusing a cache path outside {root}: {name!r}")
    return path


# The commit of a tree fetched with skip_validation from an archive whose zip comment names none.
UNKNOWN_COMMIT = ""


@dataclass(frozen=True)
class CacheEntry:
    owner: str
    repo: str
    ref: str
    commit_sha: str
    kind: str
    is_default_branch: bool
    archive_sha256: str
    tree_sha256: str
    fetched_at: float
    folder: str

    @property
    def repo_dir(self) -> Path:
        return _inside(hub_path(), self.folder)

    def matches(self, repo_ref: RepoRef) -> bool:
        # GitHub names are case-insensitive; refs are not.
        if (self.owner.lower(), self.repo.lower()) != (repo_ref.owner.lower(), repo_ref.repo.lower()):
            return False
        if repo_ref.ref is None:
            return self.is_default_branch
        return self.ref == repo_ref.ref


def _state_dir(kind: str) -> Path:
    path = hub_path() / constants.STATE_DIR_NAME / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(folder: str) -> Path:
    return _inside(_state_dir("repos"), folder + ".json")


def read_record(folder: str) -> CacheEntry | None:
    """The record of a cache folder, or None if there is none or it does not hold together."""
    try:
        data = json.loads(_record_path(folder).read_text())
        entry = CacheEntry(**data)
    except (OSError, ValueError, TypeError):
        return None
    if entry.folder != folder or not entry.repo_dir.is_dir():
        return None
    return entry


def iter_records() -> Iterator[CacheEntry]:
    """Every cache folder that has a valid record."""
    for path in sorted(_state_dir("repos").glob("*.json")):
        entry = read_record(path.name[: -len(".json")])
        if entry is not None:
            yield entry


def lookup(repo_ref: RepoRef) -> CacheEntry | None:
    """The cached tree for what the user asked, with no network: None on a miss."""
    if repo_ref.ref is not None:
        entry = read_record(folder_name(repo_ref.owner, repo_ref.repo, repo_ref.ref))
        return entry if entry is not None and entry.matches(repo_ref) else None
    # The default branch can change; the newest record that was fetched as the default wins.
    entries = [entry for entry in iter_records() if entry.matches(repo_ref)]
    return max(entries, key=lambda entry: entry.fetched_at, default=None)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the lock ``<hub_dir>/.safehub/locks/<name>.lock`` (a cache folder's, or the trusted list's)."""
    with _filelock.locked(_inside(_state_dir("locks"), name + ".lock"), name):
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_record(entry: CacheEntry) -> None:
    path = _record_path(entry.folder)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(entry), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_record(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(folder).unlink()
        _fsync_dir(_state_dir("repos"))


@contextlib.contextmanager
def work_dir(folder: str) -> Iterator[Path]:
    """A fresh private folder in ``<hub_dir>/.safehub/tmp`` for work on ``folder``; removed on exit.

    Its name starts with this process's pid, so if the process dies before the cleanup runs, the
    next work_dir() (of any process) removes it.
    """
    tmp_root = _state_dir("tmp")
    _stale.sweep(tmp_root, "", owners={os.geteuid()})
    work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.{folder}.", dir=tmp_root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install(resolved: ResolvedRef, tree_dir: Path, *, archive_sha256: str) -> CacheEntry:
    """Move the extracted ``tree_dir`` into the cache folder of ``resolved`` and record it.

    The caller holds ``locked(folder)`` and extracted ``tree_dir`` inside a :func:`work_dir`, so
    the move is one rename on one filesystem. A ``resolved.commit_sha`` of None is recorded as
    :data:`UNKNOWN_COMMIT`.
    """
    folder = folder_name(resolved.owner, resolved.repo, resolved.ref)
    target = _inside(hub_path(), folder)
    tree_sha256 = tree_digest(tree_dir)
    with work_dir(folder) as trash:
        # The old record goes first: from here until the new one is written nothing is served.
        _remove_record(folder)
        if target.exists() or target.is_symlink():
            os.rename(target, trash / "old")
        os.rename(tree_dir, target)
        _fsync_dir(target.parent)
        entry = CacheEntry(
            owner=resolved.owner,
            repo=resolved.repo,
            ref=resolved.ref,
            commit_sha=resolved.commit_sha or UNKNOWN_COMMIT,
            kind=resolved.kind,
            is_default_branch=resolved.is_default_branch,
            archive_sha256=archive_sha256,
            tree_sha256=tree_sha256,
            fetched_at=time.time(),
            folder=folder,
        )
        _write_record(entry)
    return entry


def tree_digest(root: Path) -> str:
    """sha256 over every path, type, mode bit that matters and content below ``root``.

    Recorded at install, so ``safehub cache verify`` can tell a tree changed since it was fetched.
    """
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                digest.update(f"L {rel}\0{os.readlink(path)}\0".encode())
                continue
            digest.update(f"F {rel}\0{'x' if st.st_mode & 0o111 else '-'}\0".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                digest.update(f"D {os.path.relpath(os.path.join(dirpath, name), root)}\0".encode())
    return digest.hexdigest()


def remove(entry: CacheEntry) -> None:
    """Delete a cached tree and its record, under its lock."""
    with locked(entry.folder):
        _remove_record(entry.folder)
        shutil.rmtree(entry.repo_dir, ignore_errors=True)


def entry_as_dict(entry: CacheEntry) -> dict[str, Any]:
    return {**asdict(entry), "path": str(entry.repo_dir)}
