"""A call's view: the one folder of the cache its worker may read, holding exactly what it fetched.

The worker never sees the hub dir (other repositories, the trusted_list, safehub's records). For
each call the parent makes ``<runtime_dir>/views/<pid>-<random>/`` (the per-user runtime folder,
:func:`safehub._cache.runtime_dir`: never inside the hub dir, which may be read-only or another
user's), laid out as a ``TORCH_HOME`` (``hub/checkpoints/``, ``checkpoints/``, ``repos/``) with a
Hugging Face cache beside them (``huggingface/hub/``, the worker's ``HF_HUB_CACHE``), grants
the worker read on it alone (bubblewrap binds it, Landlock allows it), and shows in it each
checkpoint or nested repository the broker serves:

- a hard link where one can be made (the runtime folder on the hub dir's filesystem, which is
  writable): the same inode as the cache's file, so a 1 GiB checkpoint is not copied;
- else a symlink to a file granted to the call before its worker started (``granted``: what the
  call's lock file pins and a hub dir already holds; the worker's read rules name each one);
- else a copy (a read-only hub dir and a file no lock named).

The view is removed when the call ends; a view whose caller died is swept by the next call, like
a stale scratch folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from .. import _cache, _log, _stale
from .._stale import remove_tree, sweepable_owners

VIEWS = "views"
_LOUD_COPY_BYTES = 64 * 1024**2
PLACES = ("hub/checkpoints", "checkpoints", "repos", HF_PLACE := "huggingface/hub")


class CallView:
    """The view folder of one call (see the module docstring)."""

    def __init__(self, granted: frozenset[str] = frozenset()) -> None:
        top = _cache.runtime_subdir(VIEWS)
        _stale.sweep(top, "", sweepable_owners())
        self.granted = granted  # real paths of cache files the worker may read in place
        self.root = top / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.root.mkdir(mode=0o755)
        for place in PLACES:
            (self.root / place).mkdir(mode=0o755, parents=True, exist_ok=True)
        for folder in [self.root, *(self.root / p for p in PLACES), self.root / "hub", self.root / "huggingface"]:
            folder.chmod(0o755)  # a worker dropped to another uid must traverse it (umask aside)

    def add_file(self, source: Path, place: str, name: str) -> Path:
        """Show the cache's file ``source`` as ``<place>/<name>``; return that path."""
        assert place in PLACES[:2] and "/" not in name
        target = self.root / place / name
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        _link_or_copy(source, target, self.granted)
        return target

    def add_hub_file(self, served: Any, relative: PurePosixPath) -> Path:
        """Show a Hugging Face cache file at ``huggingface/hub/<relative>`` (the worker's
        HF_HUB_CACHE, laid out as the real one: ``models--org--name/snapshots/<commit>/<path>``)."""
        target = self._hub_path(relative)
        if not target.exists():
            self._folders_to(target.parent)
            _link_or_copy(served.snapshot_path.resolve(), target, self.granted)
        return target

    def hub_snapshot(self, folder_name: str, commit_sha: str, revision: str) -> Path:
        """The snapshot folder of a repository in the view, with ``refs/<revision>`` as the real cache has it."""
        folder = self._hub_path(PurePosixPath(folder_name, "snapshots", commit_sha))
        self._folders_to(folder)
        if revision != commit_sha:
            ref = self._hub_path(PurePosixPath(folder_name, "refs", revision))
            self._folders_to(ref.parent)
            ref.write_text(commit_sha)
            ref.chmod(0o644)
        return folder

    def _hub_path(self, relative: PurePosixPath) -> Path:
        root = self.root / HF_PLACE
        target = root.joinpath(*relative.parts)
        if relative.is_absolute() or ".." in relative.parts or not os.path.normpath(target).startswith(str(root) + os.sep):
            raise ValueError(f"{relative} leaves the view's Hugging Face cache")
        return target

    def _folders_to(self, folder: Path) -> None:
        root = self.root / HF_PLACE
        for part in [folder, *folder.parents]:
            if part == root:
                break
            part.mkdir(mode=0o755, parents=True, exist_ok=True)
            part.chmod(0o755)  # a worker dropped to another uid must traverse it (umask aside)

    def add_tree(self, source_dir: Path, folder: str) -> Path:
        """Show a repository tree as ``repos/<folder>``: every file linked, folders made; return it."""
        assert "/" not in folder and folder not in ("", ".", "..")
        target = self.root / "repos" / folder
        if target.exists():
            return target
        tmp = self.root / "repos" / f".{folder}.{uuid.uuid4().hex[:8]}"
        for top, dirs, files in os.walk(source_dir):
            relative = Path(top).relative_to(source_dir)
            (tmp / relative).mkdir(mode=0o755, parents=True, exist_ok=True)
            (tmp / relative).chmod(0o755)
            for name in files:
                path = Path(top) / name
                if not path.is_symlink():  # extraction keeps no outside links; inside ones are skipped too
                    _link_or_copy(path, tmp / relative / name)
            dirs[:] = [d for d in dirs if not (Path(top) / d).is_symlink()]
        tmp.rename(target)
        return target

    def remove(self) -> None:
        remove_tree(self.root)


def _link_or_copy(source: Path, target: Path, granted: frozenset[str] = frozenset()) -> None:
    mode = source.stat().st_mode
    # A link shares the cache file's owner and mode: where others may not read it, a worker
    # dropped to another uid could not either, so it gets a readable copy instead.
    if mode & stat.S_IROTH:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem (a read-only mount is one), or links refused
        if os.path.realpath(source) in granted:
            os.symlink(os.path.realpath(source), target)  # the worker's rules grant that file itself
            return
    if source.stat().st_size > _LOUD_COPY_BYTES:
        _log.info(f"copying {source} into the call's view ({source.stat().st_size} bytes): it cannot be linked "
                  "from the runtime folder; a lock file that pins it lets the worker read it in place")
    shutil.copyfile(source, target)
    target.chmod(0o644)
