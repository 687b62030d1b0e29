"""Archive extraction: no escapes, no outside links, caps on size and member count.

A GitHub zipball holds one top folder (``owner-repo-abc1234/``) and everything under it. Every
member is checked before anything is written, then written through directory file descriptors
opened with ``O_NOFOLLOW``, so no write ever follows a link, whatever the archive or a concurrent
process puts on disk. Symlinks inside the tree are kept (repositories use them); a link that
points out of the tree, or a member that would be written through a link, is refused.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from . import constants
from .errors import ArchiveError
from ._worker import with_article

# Longest symlink target we accept; Linux's PATH_MAX. Anything longer is not a real link.
MAX_LINK_TARGET_BYTES = 4096

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_COMMIT_COMMENT = re.compile(rb"[0-9a-f]{40}")
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

# What zipfile and its decompressors raise on a corrupt archive (a CRC mismatch is BadZipFile,
# raised at the end of a member; an unknown zip version or method is NotImplementedError).
_CORRUPT_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    NotImplementedError,
    EOFError,
    ValueError,
)
try:
    import lzma

    _CORRUPT_ZIP_ERRORS += (lzma.LZMAError,)
except ImportError:  # Python built without lzma: zipfile cannot open such members either
    pass


@dataclass(frozen=True)
class _Member:
    """One archive entry after validation: its path parts and what kind of file it is."""

    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # path components, the top folder first
    kind: str  # "dir", "file" or "symlink"
    executable: bool

    @property
    def name(self) -> str:
        return self.info.orig_filename


def extract_zip(
    zip_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
    max_members: int | None = None,
) -> pathlib.Path:
    """Extract a GitHub zipball into ``dest_dir`` and return the path of its single top folder.

    Every member is validated before anything is written: names (no absolute paths, drive
    letters, backslashes, ``.``/``..`` or empty components, control characters, duplicates), the
    layout (exactly one top folder, no files beside it), the member count and the declared sizes,
    and the file types (regular files, folders and symlinks only). Files are then written with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (mode ``0o644``, or ``0o755`` when the archive marks them
    executable; folders ``0o755``; the process umask applies) while the bytes actually
    decompressed are counted against ``max_bytes``.

    Args:
        zip_path: the archive.
        dest_dir: an empty folder made by the caller for this archive alone.
        max_bytes: the most bytes all members may decompress to, together
            (default ``constants.MAX_EXTRACTED_BYTES``, read at call time).
        max_members: the most entries the archive may hold
            (default ``constants.MAX_ARCHIVE_MEMBERS``, read at call time).

    Returns:
        ``dest_dir / <top folder>``.

    Raises:
        ArchiveError: the archive is not a zip, is corrupt (including a CRC mismatch found while
            reading), is over a cap, or is hostile. The message names the member.

    On error, ``dest_dir`` may hold part of the tree: the caller deletes ``dest_dir`` (with
    ``shutil.rmtree``, which does not follow links).

    Example:
        >>> top_dir = extract_zip("/tmp/repo.zip", "/tmp/fresh-empty-dir")  # doctest: +SKIP
        >>> (top_dir / "hubconf.py").exists()  # doctest: +SKIP
        True
    """
    dest_dir = pathlib.Path(dest_dir)
    max_bytes = constants.MAX_EXTRACTED_BYTES if max_bytes is None else max_bytes
    max_members = constants.MAX_ARCHIVE_MEMBERS if max_members is None else max_members
    with _open_zip(zip_path, max_members) as zf:
        members = _validate_members(zf.infolist(), max_bytes, max_members)
        top = members[0].parts[0]
        _write_members(zf, members, dest_dir, max_bytes)
    top_dir = dest_dir / top
    _check_links_stay_inside(top_dir, [m for m in members if m.kind == "symlink"], dest_dir)
    return top_dir


def commit_in_comment(zip_path: str | os.PathLike[str]) -> str | None:
    """The commit SHA that ``git archive`` (and so GitHub's zipball) writes as the zip comment, or None.

    Only a comment that is exactly 40 lowercase hex digits counts; anything else is no commit.
    """
    with _open_zip(zip_path, constants.MAX_ARCHIVE_MEMBERS) as zf:
        comment = zf.comment
    return comment.decode("ascii") if _COMMIT_COMMENT.fullmatch(comment) else None


# --- opening ---------------------------------------------------------------------------------


@contextmanager
def _open_zip(zip_path: str | os.PathLike[str], max_members: int) -> Iterator[zipfile.ZipFile]:
    name = os.fspath(zip_path)
    with open(name, "rb") as fp:
        _check_declared_count(fp, name, max_members)
        try:
            zf = zipfile.ZipFile(fp)
        except _CORRUPT_ZIP_ERRORS as exc:
            raise ArchiveError(f"{name!r} is not a valid zip archive: {exc}") from exc
        with zf:
            yield zf


def _check_declared_count(fp: BinaryIO, name: str, max_members: int) -> None:
    """Refuse a member count over the cap before zipfile builds one object per entry."""
    # Prevents a central directory of millions of entries from exhausting memory while parsed;
    # a count that understates the directory is caught after parsing, in _validate_members.
    end_record = getattr(zipfile, "_EndRecData", None)  # private, but stable since Python 2
    if end_record is None:
        return
    try:
        record = end_record(fp)
    except (OSError, ValueError, zipfile.BadZipFile):
        record = None
    fp.seek(0)
    if record is None:
        raise ArchiveError(f"{name!r} is not a zip archive (no end-of-central-directory record).")
    count = record[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]  # noqa: SLF001
    if count > max_members:
        raise ArchiveError(f"{name!r} declares {count} members, over the limit of {max_members}.")


# --- validation, before anything is written ---------------------------------------------------


def _validate_members(infos: list[zipfile.ZipInfo], max_bytes: int, max_members: int) -> list[_Member]:
    if not infos:
        raise ArchiveError("The zip archive is empty; expected one top-level folder.")
    if len(infos) > max_members:
        # The end record's count can understate the central directory; count what zipfile read.
        raise ArchiveError(f"The archive has {len(infos)} members, over the limit of {max_members}.")
    members = [_validate_member(info) for info in infos]
    _check_single_top(members)
    _check_no_duplicates(members)
    declared = sum(m.info.file_size for m in members)
    if declared > max_bytes:
        # Honest headers let us refuse at once; lying ones are caught while streaming.
        raise ArchiveError(f"The archive declares {declared} bytes, over the limit of {max_bytes}.")
    return members


def _validate_member(info: zipfile.ZipInfo) -> _Member:
    # orig_filename: zipfile silently cuts ZipInfo.filename at the first NUL.
    name = info.orig_filename
    _check_name(name)
    if info.flag_bits & 0x1:
        raise ArchiveError(f"Member {name!r} is encrypted; refusing it.")
    is_dir_name = name.endswith("/")
    parts = tuple(name.rstrip("/").split("/")) if is_dir_name else tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            # Prevents path traversal ("..") and aliases of one path under two names.
            raise ArchiveError(f"Member {name!r} has an empty, '.' or '..' path component.")
    kind, executable = _member_kind(info, name, is_dir_name)
    return _Member(info=info, parts=parts, kind=kind, executable=executable)


def _check_name(name: str) -> None:
    if not name:
        raise ArchiveError("A member has an empty name.")
    if _CONTROL_CHARS.search(name):
        # Prevents names cut short at a NUL and terminal escapes in listings and logs.
        raise ArchiveError(f"Member {name!r} has a NUL or control character in its name.")
    if name.startswith("/"):
        raise ArchiveError(f"Member {name!r} has an absolute path.")
    if _DRIVE_LETTER.match(name):
        raise ArchiveError(f"Member {name!r} starts with a drive letter.")
    if "\\" in name:
        # Prevents a path that is one name here and a traversal on Windows.
        raise ArchiveError(f"Member {name!r} contains a backslash.")


def _member_kind(info: zipfile.ZipInfo, name: str, is_dir_name: bool) -> tuple[str, bool]:
    mode = info.external_attr >> 16  # Unix mode; 0 when the archiver wrote none
    file_type = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        if is_dir_name:
            raise ArchiveError(f"Member {name!r} is a symlink with a folder name.")
        return "symlink", False
    if is_dir_name or stat.S_ISDIR(mode):
        if file_type not in (0, stat.S_IFDIR) or not is_dir_name:
            raise ArchiveError(f"Member {name!r} is a folder without a trailing '/' or of two types.")
        return "dir", False
    if file_type not in (0, stat.S_IFREG):
        # Prevents device nodes, FIFOs and sockets planted in the cache.
        raise ArchiveError(f"Member {name!r} is a special file (mode {oct(mode)}); refusing it.")
    return "file", bool(mode & 0o111)


def _check_single_top(members: list[_Member]) -> None:
    tops = {m.parts[0] for m in members}
    if len(tops) != 1:
        shown = ", ".join(repr(t) for t in sorted(tops)[:5])
        raise ArchiveError(f"Expected one top-level folder in the archive, found {len(tops)}: {shown}.")
    for m in members:
        if len(m.parts) == 1 and m.kind != "dir":
            raise ArchiveError(f"Member {m.name!r} is {with_article(m.kind)} at the top level; expected a folder.")


def _check_no_duplicates(members: list[_Member]) -> None:
    seen: set[tuple[str, ...]] = set()
    for m in members:
        if m.parts in seen:
            # Prevents a later member replacing a file that was already checked.
            raise ArchiveError(f"Member {m.name!r} appears more than once in the archive.")
        seen.add(m.parts)


# --- writing --------------------------------------------------------------------------------


def _write_members(zf: zipfile.ZipFile, members: list[_Member], dest_dir: pathlib.Path, max_bytes: int) -> None:
    budget = [max_bytes]  # bytes still allowed, shared by all members
    links: set[tuple[str, ...]] = set()
    root_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for m in members:
            _refuse_through_link(m, links)
            with _member_errors(m):
                _write_member(zf, m, root_fd, budget)
            if m.kind == "symlink":
                links.add(m.parts)
    finally:
        os.close(root_fd)


@contextmanager
def _member_errors(m: _Member) -> Iterator[None]:
    """Translate what reading or writing one member raises into ArchiveError naming it."""
    try:
        yield
    except ArchiveError:
        raise
    except OSError as exc:
        raise ArchiveError(f"Could not extract member {m.name!r}: {exc}") from exc
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Corrupt member {m.name!r}: {exc}") from exc


def _refuse_through_link(m: _Member, links: set[tuple[str, ...]]) -> None:
    for i in range(1, len(m.parts)):
        if m.parts[:i] in links:
            # Prevents writing outside the tree through a link the archive itself planted.
            raise ArchiveError(f"Member {m.name!r} goes through the symlink {'/'.join(m.parts[:i])!r}.")


def _write_member(zf: zipfile.ZipFile, m: _Member, root_fd: int, budget: list[int]) -> None:
    parent_fd = _open_parents(root_fd, m.parts[:-1])
    try:
        leaf = m.parts[-1]
        if m.kind == "dir":
            os.close(_open_or_make_dir(parent_fd, leaf))
        elif m.kind == "symlink":
            target = _read_link_target(zf, m, budget)
            os.symlink(target, leaf, dir_fd=parent_fd)
        else:
            _write_file(zf, m, parent_fd, leaf, budget)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def _open_parents(root_fd: int, parts: tuple[str, ...]) -> int:
    """Open (making as needed) each folder of ``parts`` below ``root_fd``; never follow a link."""
    fd = root_fd
    for part in parts:
        try:
            child = _open_or_make_dir(fd, part)
        finally:
            if fd != root_fd:
                os.close(fd)
        fd = child
    return fd


def _open_or_make_dir(parent_fd: int, name: str) -> int:
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass  # a folder made for an earlier member; O_NOFOLLOW below refuses anything else
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _write_file(zf: zipfile.ZipFile, m: _Member, parent_fd: int, leaf: str, budget: list[int]) -> None:
    mode = 0o755 if m.executable else 0o644
    fd = os.open(leaf, _FILE_FLAGS, mode, dir_fd=parent_fd)
    with os.fdopen(fd, "wb") as out, zf.open(m.info) as src:
        while chunk := src.read(constants.READ_CHUNK):
            _spend(budget, len(chunk), m)
            out.write(chunk)


def _read_link_target(zf: zipfile.ZipFile, m: _Member, budget: list[int]) -> str:
    with zf.open(m.info) as src:
        raw = src.read(MAX_LINK_TARGET_BYTES + 1)
        _spend(budget, len(raw), m)
        if len(raw) > MAX_LINK_TARGET_BYTES:
            raise ArchiveError(f"Symlink {m.name!r} has a target over {MAX_LINK_TARGET_BYTES} bytes.")
        src.read(1)  # reach the end, where zipfile checks the CRC
    try:
        target = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"Symlink {m.name!r} has a target that is not UTF-8.") from exc
    _check_link_target(m, target)
    return target


def _check_link_target(m: _Member, target: str) -> None:
    if not target or _CONTROL_CHARS.search(target) or "\\" in target:
        raise ArchiveError(f"Symlink {m.name!r} has an empty or malformed target {target!r}.")
    if target.startswith("/") or _DRIVE_LETTER.match(target):
        # Prevents a link to the user's files (~/.ssh, /etc) that a later reader would follow.
        raise ArchiveError(f"Symlink {m.name!r} points to the absolute path {target!r}.")
    resolved = posixpath.normpath(posixpath.join(*m.parts[:-1], target))
    if resolved != m.parts[0] and not resolved.startswith(m.parts[0] + "/"):
        raise ArchiveError(f"Symlink {m.name!r} -> {target!r} points outside the archive's folder.")


def _spend(budget: list[int], nbytes: int, m: _Member) -> None:
    budget[0] -= nbytes
    if budget[0] < 0:
        # Prevents zip bombs whose headers understate what they decompress to.
        raise ArchiveError(f"Extraction passed the size limit while writing member {m.name!r}.")


def _check_links_stay_inside(top_dir: pathlib.Path, links: list[_Member], dest_dir: pathlib.Path) -> None:
    """Resolve every link on disk, chains included, and refuse one that ends outside the tree."""
    # The per-link check is lexical; a chain ("a" -> "sub/l/..", where "sub/l" -> "..") can
    # still climb out, which only resolving the links as written reveals.
    top_real = os.path.realpath(top_dir)
    for m in links:
        real = os.path.realpath(dest_dir.joinpath(*m.parts))
        if real != top_real and not real.startswith(top_real + os.sep):
            raise ArchiveError(f"Symlink {m.name!r} resolves to {real!r}, outside the archive's folder.")


# --- torch.hub's legacy checkpoint zip: one file, no folders ----------------------------------


def extract_single_file(
    zip_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
) -> pathlib.Path:
    """Extract the only member of a legacy checkpoint zip (torch.save < 1.6, zipped by hand).

    The member must be a regular file with a plain name (no folder, no ``..``). It is written to
    a name unique to this process and renamed over ``dest_dir / name``, so a concurrent reader
    sees the old file or the new one, never half of one; the temporary file is removed on error.

    Args:
        zip_path: the downloaded archive.
        dest_dir: the folder to place the file in (torch.hub uses the checkpoint folder).
        max_bytes: the most bytes the member may decompress to
            (default ``constants.MAX_EXTRACTED_BYTES``, read at call time).

    Returns:
        The path of the extracted file.

    Raises:
        ArchiveError: not a zip, corrupt, over ``max_bytes``, or not exactly one plain file.

    Example:
        >>> extract_single_file("resnet18-5c106cde.zip", "/tmp/checkpoints")  # doctest: +SKIP
        PosixPath('/tmp/checkpoints/resnet18-5c106cde.pth')
    """
    dest_dir = pathlib.Path(dest_dir)
    max_bytes = constants.MAX_EXTRACTED_BYTES if max_bytes is None else max_bytes
    with _open_zip(zip_path, max_members=1) as zf:
        m = _validate_single_file(zf.infolist(), max_bytes)
        return _write_single_file(zf, m, dest_dir, max_bytes)


def _validate_single_file(infos: list[zipfile.ZipInfo], max_bytes: int) -> _Member:
    if len(infos) != 1:
        raise ArchiveError(f"A legacy checkpoint zip must hold exactly one file, not {len(infos)}.")
    m = _validate_member(infos[0])
    if len(m.parts) != 1 or m.kind != "file":
        # Prevents a legacy checkpoint writing anywhere but beside itself.
        raise ArchiveError(f"Member {m.name!r} must be a plain file name with no folder.")
    if m.info.file_size > max_bytes:
        raise ArchiveError(f"Member {m.name!r} declares {m.info.file_size} bytes, over the limit of {max_bytes}.")
    return m


def _write_single_file(zf: zipfile.ZipFile, m: _Member, dest_dir: pathlib.Path, max_bytes: int) -> pathlib.Path:
    final_path = dest_dir / m.parts[0]
    tmp_name = f".{m.parts[0]}.{os.getpid()}.{os.urandom(8).hex()}.partial"
    dir_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        with _member_errors(m):
            _write_file(zf, m, dir_fd, tmp_name, [max_bytes])
            os.replace(tmp_name, m.parts[0], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp_name, dir_fd)  # Ctrl-C included: no temporary file is left behind
        raise
    finally:
        os.close(dir_fd)
    return final_path


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
