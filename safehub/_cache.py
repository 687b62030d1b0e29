"""The hub dir: torch.hub's layout, plus locks, metadata and atomic installs.

Repository trees live where torch.hub puts them (``<hub_dir>/<owner>_<repo>_<ref>``), so both
tools share one cache. safehub's own state lives in ``<hub_dir>/.safehub/``:

- ``repos/<folder>.json``: what the tree is (owner, repo, ref, commit SHA, archive sha256, tree
  digest). A tree without its record is never served: it may be half written, torch.hub's, or
  another ref's.
- ``trees/<folder>.json``: the tree's manifest at install (:mod:`safehub._tree`), so a changed
  tree can be told file by file.
- ``files/<place>/<name>.json``: what a checkpoint downloaded on a worker's behalf (or by
  ``safehub cache fill``) was when it arrived: URL, size, sha256; ``safehub cache verify`` checks it.
- ``locks/<folder>.lock``: one lock per cache folder, so parallel jobs download once.
- ``tmp/``: downloads and extractions in progress, renamed into place when whole.

An install writes the tree first and the record last, and removes the record before touching an
old tree, so a crash at any point leaves either a served tree with a true record, or no record.

Reading the cache writes nothing in the hub dir (it may be a read-only mount, or another user's):
what readers need to write (per-call views, digest memos) lives in the per-user runtime folder,
:func:`runtime_dir`.
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

from . import _filelock, _stale, _tree, constants
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
    tree_format: int = 1  # which digest tree_sha256 is: 1 the older walk digest, 2 _tree's
    hub_dir: str = ""  # the hub dir it was found in, when a shared one; never written in the record

    def tree_matches(self, root: Path | None = None) -> bool:
        """Whether the tree on disk is still the one recorded (hashing only what changed stamp)."""
        root = self.repo_dir if root is None else root
        if self.tree_format == _tree.FORMAT:
            return tree_manifest(root).digest == self.tree_sha256
        return tree_digest(root) == self.tree_sha256

    @property
    def repo_dir(self) -> Path:
        return _inside(Path(self.hub_dir) if self.hub_dir else hub_path(), self.folder)

    @property
    def shared(self) -> bool:
        """Whether it lives in a shared (read-only) hub dir of SAFEHUB_SHARED_HUB_DIRS."""
        return bool(self.hub_dir)

    def matches(self, repo_ref: RepoRef) -> bool:
        # GitHub names are case-insensitive; refs are not.
        if (self.owner.lower(), self.repo.lower()) != (repo_ref.owner.lower(), repo_ref.repo.lower()):
            return False
        if repo_ref.ref is None:
            return self.is_default_branch
        return self.ref == repo_ref.ref


def shared_hub_dirs() -> list[Path]:
    """The read-only hub dirs of ``SAFEHUB_SHARED_HUB_DIRS`` that exist, in order (the writable one left out)."""
    own = os.path.realpath(get_dir())
    return [Path(d) for d in constants.SAFEHUB_SHARED_HUB_DIRS if os.path.isdir(d) and os.path.realpath(d) != own]


def trusted_list_path() -> Path:
    """torch.hub's ``<hub_dir>/trusted_list``."""
    return hub_path() / constants.TRUSTED_LIST_NAME


def checkpoint_dir(place: str, hub_dir: Path | None = None) -> Path:
    """torch.hub's checkpoints folder: ``<hub_dir>/checkpoints`` (``hub/checkpoints``), or
    ``<torch_home>/checkpoints`` (``checkpoints``, where NVIDIA's entrypoints keep files)."""
    hub_dir = hub_path() if hub_dir is None else hub_dir
    if place == "hub/checkpoints":
        return hub_dir / "checkpoints"
    if place == "checkpoints":
        # The writable hub dir's torch home is TORCH_HOME as torch.hub reads it; a shared one's is its parent.
        return (Path(constants.TORCH_HOME) if hub_dir == hub_path() else hub_dir.parent) / "checkpoints"
    raise SafeHubError(f"No checkpoints folder {place!r}")


def find_checkpoint(place: str, name: str) -> Path | None:
    """The first regular file ``name`` in ``place`` of the shared hub dirs in order, then of the
    writable one; None if none holds it."""
    for hub_dir in [*shared_hub_dirs(), hub_path()]:
        path = _inside(checkpoint_dir(place, hub_dir), name)
        if path.is_file() and not path.is_symlink():
            return path
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A file in a checkpoints folder, and what it was when it arrived (if safehub fetched it)."""

    place: str  # "hub/checkpoints" or "checkpoints"
    path: Path
    size: int
    url: str  # "" when safehub has no record of it (torch.hub's, or fetched in-process)
    sha256: str  # the sha256 recorded when it arrived; "" without a record
    shared: bool


def _checkpoint_record_path(path: Path, place: str, hub_dir: Path | None, *, create: bool = False) -> Path:
    folder = _state_dir("files", create=create, hub_dir=hub_dir) / place.replace("/", "_")
    if create:
        folder.mkdir(exist_ok=True)
    return _inside(folder, path.name + ".json")


def record_checkpoint(path: Path, place: str, *, url: str, size: int, sha256: str) -> None:
    """Remember what a checkpoint of the writable hub dir was when it arrived (after its download)."""
    _write_atomic(_checkpoint_record_path(path, place, None, create=True),
                  json.dumps({"url": url, "size": size, "sha256": sha256, "name": path.name}))


def iter_checkpoints() -> Iterator[Checkpoint]:
    """Every regular file in the checkpoints folders of the writable hub dir and the shared ones."""
    for hub_dir in [None, *shared_hub_dirs()]:
        for place in ("hub/checkpoints", "checkpoints"):
            folder = checkpoint_dir(place, hub_dir)
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for path in children:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or path.name.endswith((".partial", ".lock")) or path.name.startswith("."):
                    continue
                record: dict[str, Any] = {}
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads(_checkpoint_record_path(path, place, hub_dir).read_text())
                yield Checkpoint(place, path, st.st_size, str(record.get("url", "")), str(record.get("sha256", "")),
                                 hub_dir is not None)


def remove_checkpoint(checkpoint: Checkpoint) -> None:
    """Delete a checkpoint of the writable hub dir and its record."""
    with contextlib.suppress(FileNotFoundError):
        _checkpoint_record_path(checkpoint.path, checkpoint.place, None).unlink()
    checkpoint.path.unlink()


def file_digest(path: Path, *, trust_memo: bool = True) -> tuple[int, str]:
    """(size, sha256) of a cached file; remembered in this user's runtime folder, so a 1 GiB
    checkpoint is hashed once, not on every load (a changed size, mtime, inode or ctime means a
    changed file; ctime cannot be set from user space)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        memo = digest_memo_path("files", str(path))  # private to this user, outside the hub dir
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(memo.read_text()) if trust_memo else {}
            if known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
                return st.st_size, known["sha256"]
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with contextlib.suppress(OSError):
        _write_atomic(memo, json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}), sync=False)
    return st.st_size, digest


def remember_file_digest(path: Path, sha256: str) -> None:
    """Remember the sha256 of a file this process just put in place (measured as it arrived)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        _write_atomic(digest_memo_path("files", str(path)), json.dumps({"path": str(path), "stamp": stamp, "sha256": sha256}),
                      sync=False)


def _state_dir(kind: str, *, create: bool = True, hub_dir: Path | None = None) -> Path:
    path = (hub_path() if hub_dir is None else hub_dir) / constants.STATE_DIR_NAME / kind
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(folder: str, *, create: bool = True) -> Path:
    return _inside(_state_dir("repos", create=create), folder + ".json")


def manifest_path(folder: str, *, create: bool = False) -> Path:
    """Where the manifest of ``folder``'s tree at install is kept."""
    return _inside(_state_dir("trees", create=create), folder + ".json")


def read_manifest(entry: CacheEntry) -> _tree.Manifest | None:
    """The manifest recorded when ``entry`` was installed, or None (an older install, or unreadable)."""
    hub_dir = Path(entry.hub_dir) if entry.hub_dir else None
    try:
        return _tree.Manifest.from_json(_inside(_state_dir("trees", create=False, hub_dir=hub_dir), entry.folder + ".json").read_text())
    except OSError:
        return None


def hub_is_writable(hub_dir: Path | None = None) -> bool:
    """Whether this process may write in the hub dir: not a read-only mount, and its to write."""
    hub_dir = hub_path() if hub_dir is None else hub_dir
    probe = hub_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # a hub dir not made yet is writable where it would be made
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(probe, os.W_OK | os.X_OK)


def runtime_dir() -> Path:
    """This user's private folder for what reading the cache must write (views, digest memos).

    ``SAFEHUB_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/safehub``, else ``<system temp>/safehub-<uid>``.
    It is made 0700 (0711 for root, whose workers drop to another uid and must reach their view
    inside it by its unguessable name), and refused unless it is a real folder of this user that
    no one else may read or write: another local user could otherwise swap a view's files.
    """
    configured = constants.SAFEHUB_RUNTIME_DIR
    if configured:
        path = Path(os.path.abspath(os.path.expanduser(configured)))
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(xdg) if xdg and os.path.isabs(xdg) and os.path.isdir(xdg) else None
        path = base / "safehub" if base is not None else Path(tempfile.gettempdir()) / f"safehub-{os.geteuid()}"
    mode = 0o711 if os.geteuid() == 0 else 0o700
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # umask aside
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o066:
        raise SafeHubError(
            f"The runtime folder {path} is not a private folder of this user (it must be a folder owned "
            f"by uid {os.geteuid()} that no other user can read or write). Remove it, or set "
            "SAFEHUB_RUNTIME_DIR to a private folder."
        )
    return path


def runtime_subdir(kind: str) -> Path:
    """``<runtime_dir>/<kind>``, made if missing (views, digests)."""
    path = runtime_dir() / kind
    path.mkdir(mode=0o711 if os.geteuid() == 0 else 0o700, exist_ok=True)
    return path


def digest_memo_path(kind: str, key: str) -> Path:
    """The per-user memo of digests for ``key`` (a tree or a file path), in the runtime folder."""
    folder = runtime_subdir("digests") / kind
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / (hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json")


def tree_manifest(root: Path) -> _tree.Manifest:
    """The manifest of the tree at ``root`` now, with this user's digest memo."""
    return _tree.of_dir(root, digest_memo_path("trees", os.path.realpath(root)))


def read_record(folder: str, hub_dir: Path | None = None) -> CacheEntry | None:
    """The record of a cache folder (of ``hub_dir``, a shared one; default the writable one),
    or None if there is none or it does not hold together."""
    try:
        data = json.loads(_inside(_state_dir("repos", create=False, hub_dir=hub_dir), folder + ".json").read_text())
        data.pop("hub_dir", None)
        entry = CacheEntry(**data, hub_dir=str(hub_dir) if hub_dir is not None else "")
    except (OSError, ValueError, TypeError):
        return None
    if entry.folder != folder or not entry.repo_dir.is_dir():
        return None
    return entry


def iter_records(hub_dir: Path | None = None) -> Iterator[CacheEntry]:
    """Every cache folder of ``hub_dir`` (default the writable one) that has a valid record."""
    for path in sorted(_state_dir("repos", create=False, hub_dir=hub_dir).glob("*.json")):
        entry = read_record(path.name[: -len(".json")], hub_dir)
        if entry is not None:
            yield entry


def lookup(repo_ref: RepoRef) -> CacheEntry | None:
    """The cached tree for what the user asked, with no network: None on a miss.

    The shared hub dirs are consulted in order, then the writable one; the first that holds it
    serves it, in place.
    """
    return next(iter(lookup_all(repo_ref)), None)


def lookup_all(repo_ref: RepoRef) -> list[CacheEntry]:
    """Every hub dir's entry for what the user asked: the shared ones in order, then the writable one."""
    found = (_lookup_in(repo_ref, hub_dir) for hub_dir in [*shared_hub_dirs(), None])
    return [entry for entry in found if entry is not None]


def _lookup_in(repo_ref: RepoRef, hub_dir: Path | None) -> CacheEntry | None:
    if repo_ref.ref is not None:
        entry = read_record(folder_name(repo_ref.owner, repo_ref.repo, repo_ref.ref), hub_dir)
        return entry if entry is not None and entry.matches(repo_ref) else None
    # The default branch can change; the newest record that was fetched as the default wins.
    entries = [entry for entry in iter_records(hub_dir) if entry.matches(repo_ref)]
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
    fields = {k: v for k, v in asdict(entry).items() if k != "hub_dir"}
    _write_atomic(_record_path(entry.folder), json.dumps(fields, indent=1, sort_keys=True))


def _write_atomic(path: Path, text: str, *, sync: bool = True) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync:
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


def install(resolved: ResolvedRef, tree_dir: Path, *, archive_sha256: str,
            manifest: _tree.Manifest | None = None) -> CacheEntry:
    """Move the extracted ``tree_dir`` into the cache folder of ``resolved`` and record it.

    The caller holds ``locked(folder)`` and extracted ``tree_dir`` inside a :func:`work_dir`, so
    the move is one rename on one filesystem. A ``resolved.commit_sha`` of None is recorded as
    :data:`UNKNOWN_COMMIT`.
    """
    folder = folder_name(resolved.owner, resolved.repo, resolved.ref)
    target = _inside(hub_path(), folder)
    manifest = _tree.of_dir(tree_dir) if manifest is None else manifest
    _write_atomic(manifest_path(folder, create=True), manifest.as_json())
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
            tree_sha256=manifest.digest,
            fetched_at=time.time(),
            folder=folder,
            tree_format=_tree.FORMAT,
        )
        _write_record(entry)
    return entry


def tree_digest(root: Path) -> str:
    """The older tree digest (records of format 1): sha256 over every path, type, mode bit that
    matters and content below ``root``. New records hold :mod:`safehub._tree`'s digest."""
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
        with contextlib.suppress(FileNotFoundError):
            manifest_path(entry.folder).unlink()
        shutil.rmtree(entry.repo_dir, ignore_errors=True)


def entry_as_dict(entry: CacheEntry) -> dict[str, Any]:
    return {**asdict(entry), "path": str(entry.repo_dir), "shared": entry.shared}
