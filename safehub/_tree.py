"""What a repository tree holds, as a manifest and one digest: from the disk, or from its archive.

A manifest maps each path below the tree's top (``/``-separated) to what is there: a folder, a
symlink and its target, or a file with its executable bit and the sha256 of its bytes. Its digest
(:attr:`Manifest.digest`, sha256 over the sorted entries) is what a record and a lock file pin,
and the same whether it is computed from the extracted tree (:func:`of_dir`) or from the zipball
(:func:`of_zip`), so ``safehub lock`` can pin a tree it never extracted.

Hashing every file on every locked load would cost a second on a large repository. :func:`of_dir`
remembers each file's sha256 with its ``(size, mtime_ns, inode, ctime_ns)`` in a per-user memo
(outside the hub dir, which may be read-only): a file whose stamp is unchanged is not read again.
``ctime`` cannot be set from user space, so a changed file cannot keep its old stamp.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The tree digest's format; a record says which one its tree_sha256 is (1: the older walk digest).
FORMAT = 2
_MEMO_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """``entries``: path -> ``"D"`` | ``"L <target>"`` | ``"F <x|-> <sha256>"``."""

    entries: dict[str, str]

    @property
    def digest(self) -> str:
        h = hashlib.sha256(b"safehub-tree-v2\0")
        for path in sorted(self.entries):
            h.update(path.encode("utf-8", "surrogateescape") + b"\0" + self.entries[path].encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()

    def changes(self, other: Manifest) -> list[str]:
        """What ``other`` (the tree now) has that this (the reference) has not: ``+ path``, ``- path``, ``~ path``."""
        out = []
        for path in sorted(set(self.entries) | set(other.entries)):
            before, after = self.entries.get(path), other.entries.get(path)
            if before == after:
                continue
            out.append(f"{'+' if before is None else '-' if after is None else '~'} {path}")
        return out

    def as_json(self) -> str:
        return json.dumps({"format": FORMAT, "entries": self.entries}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            return None
        entries = data["entries"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
            return None
        return cls(entries)


def of_dir(root: str | os.PathLike[str], memo_path: Path | None = None) -> Manifest:
    """The manifest of the tree at ``root``; files whose stamp ``memo_path`` remembers are not read.

    The memo is written back (atomically, best effort) when it learned something.
    """
    root = os.fspath(root)
    memo = _read_memo(memo_path)
    fresh: dict[str, list[object]] = {}
    entries: dict[str, str] = {}
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            children = list(it)
        for child in children:
            rel = f"{rel_dir}{child.name}"
            st = child.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = "D"
                stack.append((rel + "/", child.path))
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = f"L {os.readlink(child.path)}"
            elif stat.S_ISREG(st.st_mode):
                stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
                known = memo.get(rel)
                if known is not None and known[:4] == stamp:
                    digest = str(known[4])
                else:
                    digest = _file_sha256(child.path)
                fresh[rel] = [*stamp, digest]
                entries[rel] = f"F {'x' if st.st_mode & 0o111 else '-'} {digest}"
            else:
                entries[rel] = f"? {stat.S_IFMT(st.st_mode)}"  # a fifo or device: never in an archive
    if memo_path is not None and fresh != memo:
        _write_memo(memo_path, root, fresh)
    return Manifest(entries)


def of_zip(archive_path: str | os.PathLike[str]) -> Manifest:
    """The manifest of the tree that extracting the zipball gives (its single top folder).

    Folders are the archive's own plus every parent of a member, as extraction makes them; a
    member is a symlink or executable by its Unix mode bits, as ``_extract`` reads them.
    """
    entries: dict[str, str] = {}
    with zipfile.ZipFile(archive_path) as zf:
        for info in zf.infolist():
            parts = [p for p in info.filename.split("/") if p]
            if len(parts) < 2:
                continue  # the top folder itself
            rel = "/".join(parts[1:])
            for i in range(1, len(parts) - 1):
                entries.setdefault("/".join(parts[1:i + 1]), "D")
            mode = info.external_attr >> 16
            if info.is_dir():
                entries[rel] = "D"
            elif stat.S_ISLNK(mode):
                entries[rel] = f"L {zf.read(info).decode('utf-8', 'surrogateescape')}"
            else:
                h = hashlib.sha256()
                with zf.open(info) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                entries[rel] = f"F {'x' if mode & 0o111 else '-'} {h.hexdigest()}"
    return Manifest(entries)


def _file_sha256(path: str) -> str:
    # O_NOFOLLOW: the entry was a regular file a moment ago; never follow a link swapped in.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_memo(memo_path: Path | None) -> dict[str, list[object]]:
    if memo_path is None:
        return {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(memo_path.read_text())
        if isinstance(data, dict) and data.get("version") == _MEMO_VERSION and isinstance(data.get("files"), dict):
            return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 5}
    return {}


def _write_memo(memo_path: Path, root: str, files: dict[str, list[object]]) -> None:
    with contextlib.suppress(OSError):
        tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _MEMO_VERSION, "root": root, "files": files}))
        os.replace(tmp, memo_path)
